"""SAELens / sparsify dictionaries for the ground-truth recovery benchmark. Runs INSIDE benchmarks/.venv-anchors.

    benchmarks/.venv-anchors/bin/python benchmarks/anchors/recovery_train.py --lib saelens --arch topk \
        --acts train.safetensors --eval eval.safetensors --out run.safetensors --d-sae 256 --k 4 \
        [--recipe default|matched] [--batch-size 1024] [--lr 4e-3 --warmup-steps 20 --dead-window-tokens 131072]

Trains one dictionary on the rows of --acts ("acts" [N, d] float32, written by benchmarks/recovery.py), in order,
one pass, batch by batch, with the library's own trainer code; then encodes and decodes the rows of --eval with the
trained dictionary, by the library's own encode/decode, and writes (atomically, safetensors) its decoder directions
`decoder` [d_sae, d], the latents `latents` [N_eval, d_sae] and the reconstructions `recon` [N_eval, d]. The
caller scores them with lmscope.synthetic.recovery.score_latents, the same function that scores lmscope's
dictionaries. Prints one JSON object (the settings used).

Recipes (recorded in the JSON):
- `default`: the library's own defaults at this width and k.
  SAELens 6 (`SAETrainer`, `TopKTrainingSAE` / `BatchTopKTrainingSAE`): Adam lr 3e-4, constant, no warmup, no
  input normalisation, b_dec zeros, decoder initial norm 0.1, AuxK coefficient 1, dead window 1,000 steps, gradient
  clipping at 1; BatchTopK's threshold an EMA (rate 0.01) of the smallest kept activation.
  sparsify (`SparseCoder`, the body of `Trainer.fit` for loss_fn="fvu" on cached rows): signum under
  schedule-free (momentum 0.95), lr 5e-3 / sqrt(d_sae / 2^14), AuxK off (auxk_alpha 0), no input normalisation,
  b_dec = the first batch's mean, unit-norm decoder rows, parallel gradient removed.
- `matched`: lmscope's benchmark settings where the library has the knob: Adam at --lr, linear warmup over
  --warmup-steps and linear decay to 0 over the last 20% of steps (SAELens; sparsify's Adam schedule decays
  linearly over all steps after warmup), AuxK coefficient 1/32 with a dead window of --dead-window-tokens; SAELens
  also scales inputs to mean norm sqrt(d) (`expected_average_only_in`). Everything else stays the library's.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from _common import open_acts
from safetensors.torch import save_file


def args_() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lib", choices=("saelens", "sparsify"), required=True)
    ap.add_argument("--arch", choices=("topk", "batchtopk"), default="topk")
    ap.add_argument("--recipe", choices=("default", "matched"), default="default")
    ap.add_argument("--acts", required=True, help="safetensors with 'acts' [N, d] float32: the training rows")
    ap.add_argument("--eval", required=True, help="safetensors with 'acts' [N_eval, d]: the rows to encode")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--d-sae", type=int, required=True)
    ap.add_argument("--k", type=int, required=True)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--lr", type=float, default=4e-3, help="matched recipe only")
    ap.add_argument("--warmup-steps", type=int, default=20, help="matched recipe only")
    ap.add_argument("--dead-window-tokens", type=int, default=131_072, help="matched recipe only")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    return ap.parse_args()


def train_saelens(x: torch.Tensor, a: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    from sae_lens import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig, TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    steps = x.shape[0] // a.batch_size
    matched = a.recipe == "matched"
    sae_kw: dict[str, Any] = {"d_in": x.shape[1], "d_sae": a.d_sae, "k": a.k, "dtype": "float32", "device": "cpu"}
    if matched:
        sae_kw |= {"normalize_activations": "expected_average_only_in", "aux_loss_coefficient": 1 / 32}
    batch = a.arch == "batchtopk"
    sae = (BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(**sae_kw)) if batch
           else TopKTrainingSAE(TopKTrainingSAEConfig(**sae_kw)))  # fmt: skip
    n_norm = min(steps, 8)

    def provider() -> Iterator[torch.Tensor]:
        if matched:
            yield from x[: n_norm * a.batch_size].split(a.batch_size)  # read by the norm estimate
        yield from x.split(a.batch_size)

    trainer_kw: dict[str, Any] = {"lr_end": 3e-4 / 10}  # LanguageModelSAERunnerConfig's default: lr / 10 (unused)
    if matched:
        trainer_kw = {
            "lr": a.lr, "lr_end": 0.0, "lr_warm_up_steps": a.warmup_steps, "lr_decay_steps": steps // 5,
            "dead_feature_window": max(1, a.dead_window_tokens // a.batch_size), "n_batches_for_norm_estimate": n_norm,
        }  # fmt: skip
    cfg = SAETrainerConfig(
        total_training_samples=steps * a.batch_size, train_batch_size_samples=a.batch_size, device="cpu",
        autocast=False, logger=LoggingConfig(log_to_wandb=False), **trainer_kw,
    )  # fmt: skip
    trained = SAETrainer(cfg, sae, provider()).fit()  # folds any input scaling into the weights
    trained.eval()
    s = trained.cfg
    info = {
        "lr": cfg.lr, "lr_end": cfg.lr_end, "lr_scheduler": cfg.lr_scheduler_name, "warmup_steps": cfg.lr_warm_up_steps,
        "decay_steps": cfg.lr_decay_steps, "dead_window_steps": cfg.dead_feature_window,
        "aux_coefficient": s.aux_loss_coefficient, "normalize_activations": sae_kw.get("normalize_activations", "none"),
        "decoder_init_norm": s.decoder_init_norm, "rescale_acts_by_decoder_norm": s.rescale_acts_by_decoder_norm,
        "optimizer": "Adam (SAETrainer)", "grad_clip": 1.0, "b_dec_init": "zeros",
    }  # fmt: skip
    if batch:
        info["topk_threshold_lr"] = s.topk_threshold_lr
    return trained, info


def encode_saelens(sae: Any, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(decoder directions, latents, reconstructions) of the SAE that SAELens saves for inference
    (`save_inference_model`, loaded back by `SAE.load_from_disk`): a BatchTopK SAE becomes a JumpReLU SAE whose
    thresholds all equal its trained threshold, a TopK SAE has its decoder-norm rescaling folded in."""
    import tempfile

    from sae_lens import SAE

    with tempfile.TemporaryDirectory() as tmp:
        sae.save_inference_model(tmp)
        inf = SAE.load_from_disk(tmp, device="cpu").eval()
    z = inf.encode(x)
    z = z.to_dense() if z.is_sparse else z
    return inf.W_dec.detach(), z, inf.decode(z)


def train_sparsify(x: torch.Tensor, a: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    from sparsify import SparseCoder, SparseCoderConfig

    matched = a.recipe == "matched"
    sae = SparseCoder(x.shape[1], SparseCoderConfig(num_latents=a.d_sae, k=a.k), "cpu", dtype=torch.float32)
    steps = x.shape[0] // a.batch_size
    sched = None
    if matched:
        from transformers import get_linear_schedule_with_warmup

        opt: Any = torch.optim.Adam(sae.parameters(), lr=a.lr)
        sched = get_linear_schedule_with_warmup(opt, a.warmup_steps, steps)
        auxk_alpha, dead_tokens, lr, name = 1 / 32, a.dead_window_tokens, a.lr, "Adam, linear warmup and decay"
    else:
        from schedulefree import ScheduleFreeWrapper
        from sparsify.sign_sgd import SignSGD

        lr = 5e-3 / (a.d_sae / 2**14) ** 0.5
        opt = ScheduleFreeWrapper(SignSGD([{"params": sae.parameters(), "lr": lr}]), momentum=0.95)
        opt.train()
        auxk_alpha, dead_tokens, name = 0.0, 10_000_000, "signum under schedule-free (momentum 0.95)"
    since_fired = torch.zeros(a.d_sae, dtype=torch.long)
    for step, xb in enumerate(x.split(a.batch_size)):
        if step == 0:
            sae.b_dec.data = xb.mean(0)
        sae.set_decoder_norm_to_unit_norm()
        dead = since_fired > dead_tokens if auxk_alpha > 0 else None
        out = sae(x=xb, y=xb, dead_mask=dead, total_variance=(xb - xb.mean(0)).pow(2).sum())
        (out.fvu + auxk_alpha * out.auxk_loss + out.multi_topk_fvu / 8).backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        if sched is not None:
            sched.step()
        with torch.no_grad():
            fired = torch.zeros(a.d_sae, dtype=torch.bool)
            fired[out.latent_indices.flatten()] = True
            since_fired += xb.shape[0]
            since_fired[fired] = 0
    if not matched:
        opt.eval()  # schedule-free: the averaged weights are the trained ones
    sae.set_decoder_norm_to_unit_norm()
    info = {"lr": lr, "optimizer": name, "warmup_steps": a.warmup_steps if matched else 0, "auxk_alpha": auxk_alpha,
            "dead_window_tokens": dead_tokens, "normalize_activations": "none", "b_dec_init": "first batch mean",
            "schedule": "linear warmup, linear decay to 0 over all steps" if matched else "schedule-free"}  # fmt: skip
    return sae, info


def encode_sparsify(sae: Any, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    enc = sae.encode(x)
    z = torch.zeros(x.shape[0], sae.num_latents).scatter_(-1, enc.top_indices, enc.top_acts)
    recon = sae.decode(enc.top_acts, enc.top_indices)
    return sae.W_dec.detach(), z, recon


def main() -> None:
    a = args_()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    x, x_eval = open_acts(a.acts), open_acts(a.eval)
    x = x[: x.shape[0] // a.batch_size * a.batch_size]
    t0 = time.perf_counter()
    if a.lib == "saelens":
        sae, info = train_saelens(x, a)
    else:
        sae, info = train_sparsify(x, a)
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        decoder, z, recon = encode_saelens(sae, x_eval) if a.lib == "saelens" else encode_sparsify(sae, x_eval)
    tensors = {"decoder": decoder.float().contiguous(), "latents": z.float().contiguous(),
               "recon": recon.float().contiguous()}  # fmt: skip
    a.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = a.out.with_name(a.out.name + ".tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, a.out)
    dist = {"saelens": "sae-lens", "sparsify": "eai-sparsify"}[a.lib]
    print(json.dumps({
        "library": a.lib, "version": version(dist), "arch": a.arch, "recipe": a.recipe, "d_sae": a.d_sae, "k": a.k,
        "batch_size": a.batch_size, "steps": x.shape[0] // a.batch_size, "train_samples": x.shape[0],
        "train_seconds": seconds, "settings": info, "torch": torch.__version__, "torch_threads": a.threads,
    }), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
