"""SAELens TopK SAE training on cached activations. Runs INSIDE benchmarks/.venv-anchors.

    benchmarks/.venv-anchors/bin/python benchmarks/anchors/saelens_train_topk.py --acts acts.safetensors \
        --train-tokens 196608 [--d-sae 4608 --k 32 --batch-size 4096]

Uses SAELens' own `SAETrainer` + `TopKTrainingSAE` (fp32, no autocast) with a data provider that yields the
cached rows in order, batch by batch: Adam, gradient clipping at 1, activations scaled to mean norm sqrt(d_in)
("expected_average_only_in", estimated on the first batches), constant LR with linear warmup and a linear
decay over the last 20% of steps, AuxK with a 1/32 coefficient. Step times come from a wrapper around the
trainer's public `step` (norm estimation and setup excluded). SAELens' default b_dec init (zeros) is kept.
Prints one JSON object; with --serve, steps are paced by the caller (see _common.StepGate).

Two options of `TopKTrainingSAEConfig` change its speed: `use_sparse_activations` (default False; SAELens
documents it as worthwhile "if using float32 and not using autocast", which is this case: the latents become a
sparse COO tensor and the decoder a sparse matmul) and `rescale_acts_by_decoder_norm` (default True; SAELens
6.54.12 cannot combine it with sparse activations, so the sparse configuration turns it off).
`--sparse-activations` and `--no-rescale` set them; the JSON records both under `config`.
benchmarks/train_throughput.py probes the working configurations and benchmarks the fastest.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator
from importlib.metadata import version

import torch
from _common import StepGate, convergence, fvu, load_acts, rate, report, train_args
from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
from sae_lens.config import LoggingConfig, SAETrainerConfig
from sae_lens.training.sae_trainer import SAETrainer


def options(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--sparse-activations", action="store_true", help="use_sparse_activations=True")
    ap.add_argument("--no-rescale", action="store_true", help="rescale_acts_by_decoder_norm=False")


def main() -> None:
    args = train_args(__doc__, options)
    t_setup = time.perf_counter()
    x, x_eval = load_acts(args)
    steps = x.shape[0] // args.batch_size
    torch.manual_seed(args.seed)
    sae = TopKTrainingSAE(
        TopKTrainingSAEConfig(
            d_in=x.shape[1], d_sae=args.d_sae, k=args.k, dtype="float32", device="cpu",
            normalize_activations="expected_average_only_in", aux_loss_coefficient=1 / 32,
            use_sparse_activations=args.sparse_activations, rescale_acts_by_decoder_norm=not args.no_rescale,
        )
    )  # fmt: skip
    n_norm = min(steps, 8)

    def provider() -> Iterator[torch.Tensor]:
        yield from x[: n_norm * args.batch_size].split(args.batch_size)  # read by the norm estimate
        yield from x.split(args.batch_size)  # then training starts at row 0

    data = provider()
    trainer = SAETrainer(
        SAETrainerConfig(
            total_training_samples=x.shape[0], train_batch_size_samples=args.batch_size, lr=args.lr, lr_end=args.lr,
            lr_warm_up_steps=args.warmup_steps, lr_decay_steps=steps // 5, device="cpu", autocast=False,
            logger=LoggingConfig(log_to_wandb=False), n_batches_for_norm_estimate=n_norm,
        ),
        sae,
        data,
    )  # fmt: skip
    gate = StepGate(args.serve)
    fvus: list[float] = []
    step = trainer.step

    def timed_step(batch: torch.Tensor) -> object:
        gate.start()
        out = step(batch)
        gate.stop()
        fvus.append(fvu(out.sae_in.detach(), out.sae_out.detach()))  # the scaled batch: FVU is scale-free
        return out

    trainer.step = timed_step  # type: ignore[method-assign]
    setup_s = time.perf_counter() - t_setup
    gate.ready()
    t0 = time.perf_counter()
    trained = trainer.fit()  # folds the activation scaling into the weights at the end
    train_s = time.perf_counter() - t0

    with torch.no_grad():
        trained.eval()
        final = fvu(x_eval, trained(x_eval))
        z = trained.encode(x_eval)
        eval_dead = float(((z.to_dense() if z.is_sparse else z) > 0).any(0).logical_not().float().mean())
    report(
        {
            "library": "sae_lens",
            "version": version("sae-lens"),
            "arch": "topk",
            "d_in": x.shape[1],
            "d_sae": args.d_sae,
            "k": args.k,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "warmup_steps": args.warmup_steps,
            "steps": len(gate.seconds),
            "train_tokens": trainer.n_training_samples,
            "tokens_per_s": rate(gate.seconds, args.batch_size),
            "train_seconds": sum(gate.seconds),
            "wall_seconds": train_s,
            "step_seconds": gate.seconds,
            "setup_seconds": setup_s,
            "final_fvu": final,
            "eval_tokens": x_eval.shape[0],
            "eval_dead_frac": eval_dead,
            "last_batch_fvu": fvus[-1],
            "step_fvu": fvus,
            "convergence": convergence(fvus),
            "dead_frac": float(trainer.dead_neurons.float().mean()),
            "normalisation": "expected_average_only_in (mean norm sqrt(d_in), folded after training)",
            "config": {
                "use_sparse_activations": args.sparse_activations,
                "rescale_acts_by_decoder_norm": not args.no_rescale,
                "dtype": "float32",
                "autocast": False,
                "optimizer": "SAETrainer's torch.optim.Adam",
            },
        }
    )


if __name__ == "__main__":
    main()
