"""EleutherAI sparsify TopK SAE training on cached activations. Runs INSIDE benchmarks/.venv-anchors.

    benchmarks/.venv-anchors/bin/python benchmarks/anchors/sparsify_train_topk.py --acts acts.safetensors \
        --train-tokens 196608 [--d-sae 4608 --k 32 --batch-size 4096]

sparsify's `Trainer` only trains from a model + token dataset (its SAEs run inside forward hooks), so this
runs the body of its hook + step for loss_fn="fvu" on cached rows instead, with sparsify's own `SparseCoder`
(fused encoder, sparse decoder, FVU + AuxK loss), Adam (torch.optim, as sparsify falls back to without
bitsandbytes) and its linear warmup/decay schedule. Per step, as in `Trainer.fit`: b_dec = batch mean on step
0, decoder rows renormalised, forward on (x, x), loss = fvu + auxk_alpha * auxk, backward, parallel gradient
removed, optimiser + scheduler step, dead-latent counters updated. Inputs are not normalised (sparsify does
not). Prints one JSON object; with --serve, steps are paced by the caller (see _common.StepGate).

Configuration: sparsify's fastest on a CPU is its only one there: the fused encoder (dense forward, sparse
backward through embedding_bag / index_add) and the eager `embedding_bag` decoder (triton, its faster decoder,
needs a GPU), fp32 (its bf16 autocast is CUDA-only), multi_topk off (its default). Its own Trainer's default
optimiser is signum; Adam is used here, as for the other libraries. The JSON records this under `config`.
"""

from __future__ import annotations

import time
from importlib.metadata import version

import torch
from _common import StepGate, convergence, fvu, load_acts, rate, report, train_args
from sparsify import SparseCoder, SparseCoderConfig
from sparsify.utils import decoder_impl
from transformers import get_linear_schedule_with_warmup

AUXK_ALPHA = 1 / 32
DEAD_THRESHOLD = 10_000_000  # tokens (sparsify's default)


def main() -> None:
    args = train_args(__doc__)
    t_setup = time.perf_counter()
    x, x_eval = load_acts(args)
    torch.manual_seed(args.seed)
    sae = SparseCoder(x.shape[1], SparseCoderConfig(num_latents=args.d_sae, k=args.k), "cpu", dtype=torch.float32)
    steps = x.shape[0] // args.batch_size
    opt = torch.optim.Adam(sae.parameters(), lr=args.lr)
    sched = get_linear_schedule_with_warmup(opt, args.warmup_steps, steps)
    since_fired = torch.zeros(args.d_sae, dtype=torch.long)
    did_fire = torch.zeros(args.d_sae, dtype=torch.bool)
    setup_s = time.perf_counter() - t_setup

    gate = StepGate(args.serve)
    fvus: list[float] = []
    gate.ready()
    t0 = time.perf_counter()
    for step, xb in enumerate(x.split(args.batch_size)):
        gate.start()
        if step == 0:
            sae.b_dec.data = xb.mean(0)
        sae.set_decoder_norm_to_unit_norm()
        dead = since_fired > DEAD_THRESHOLD
        total_variance = (xb - xb.mean(0)).pow(2).sum()
        out = sae(x=xb, y=xb, dead_mask=dead, total_variance=total_variance)
        did_fire[out.latent_indices.flatten()] = True
        fvus.append(float(out.fvu.detach()))
        loss = out.fvu + AUXK_ALPHA * out.auxk_loss + out.multi_topk_fvu / 8
        loss.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        sched.step()
        with torch.no_grad():
            since_fired += xb.shape[0]
            since_fired[did_fire] = 0
            did_fire.zero_()
        gate.stop()
    train_s = time.perf_counter() - t0

    with torch.no_grad():
        sae.set_decoder_norm_to_unit_norm()
        final = fvu(x_eval, sae(x_eval).sae_out)
        enc = sae.encode(x_eval)
        fired = torch.zeros(args.d_sae, dtype=torch.bool)
        fired[enc.top_indices[enc.top_acts > 0]] = True
        eval_dead = float((~fired).float().mean())
    report(
        {
            "library": "sparsify",
            "version": version("eai-sparsify"),
            "arch": "topk",
            "d_in": x.shape[1],
            "d_sae": args.d_sae,
            "k": args.k,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "warmup_steps": args.warmup_steps,
            "steps": len(gate.seconds),
            "train_tokens": x.shape[0],
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
            "dead_frac": float((since_fired > DEAD_THRESHOLD).float().mean()),
            "normalisation": "none (sparsify trains on raw activations)",
            "config": {
                "activation": sae.cfg.activation,
                "decoder": decoder_impl.__name__,
                "multi_topk": sae.cfg.multi_topk,
                "dtype": "float32",
                "optimizer": "torch.optim.Adam (sparsify's Trainer with optimizer='adam'; its default is signum)",
                "auxk_alpha": AUXK_ALPHA,
            },
        }
    )


if __name__ == "__main__":
    main()
