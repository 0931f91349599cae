"""lmscope TopK training step on random data against the encoder-matmul ceilings of the same shapes (JSON).

    .venv/bin/python benchmarks/train_topk.py [--threads 2] [--steps 10] [--dense]

d=576, m=4608, k=32, batch 4096, Adam (the shapes of train_throughput.py, without a model or the anchors).
lmscope's TopK step is one fused autograd Function (`lmscope.dictionaries.sparse_decode.FusedTopK`): the only
dense matrix product it executes is the encoder forward, `addmm(b_enc, x, W_enc)`, 2*d*m FLOPs per token; the
value gradients, the encoder and decoder gradients and the decoder are sparse. So the step is measured against
two ceilings timed in the same run on the same shapes (see _ceilings.py): that addmm alone, and that addmm
followed by `topk(k)`. `fraction_of_matmul_topk` (tokens/s over the addmm+topk tokens/s) is at most 1.

`--dense` also times plain autograd on dense latents (a dense decoder and a dense encoder backward: what a
straightforward implementation does) for comparison. Prints a summary and writes
benchmarks/results/train_topk.json.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from _ceilings import best_of, topk_ceilings
from _runinfo import run_info
from lmscope.core.atomic import atomic_write_json
from lmscope.dictionaries import DictConfig, build
from lmscope.training import RunSpec, TensorSource, TrainConfig, Trainer

ROOT = Path(__file__).resolve().parent


def dense_reference_step_times(cfg: DictConfig, x: torch.Tensor, batch: int, steps: int) -> list[float]:
    """Step times of plain autograd on dense latents (what SAELens-style code does without sparse activations)."""
    d = build(cfg, seed=0)
    opt = torch.optim.Adam(d.parameters(), lr=1e-4)
    times = []
    for i in range(steps):
        xb = x[i * batch : (i + 1) * batch]
        t = time.perf_counter()
        pre = (xb - d.b_dec) @ d.W_enc + d.b_enc
        vals, idx = pre.topk(cfg.k, dim=-1)
        z = torch.zeros_like(pre).scatter(-1, idx, torch.relu(vals))
        loss = (z @ d.W_dec + d.b_dec - xb).pow(2).sum(-1).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        d.post_step()
        times.append(time.perf_counter() - t)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=10, help="timed steps (after 2 warm-up steps)")
    p.add_argument("--d", type=int, default=576)
    p.add_argument("--m", type=int, default=4608)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--ceiling-repeats", type=int, default=10)
    p.add_argument("--dense", action="store_true", help="also time the dense-autograd reference")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "train_topk.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    d, m, k, batch = args.d, args.m, args.k, args.batch
    n_steps = args.steps + 2
    x = torch.randn(n_steps * batch, d, generator=torch.Generator().manual_seed(0))

    ceilings = [topk_ceilings(batch, d, m, k, args.ceiling_repeats)]
    cfg = DictConfig(arch="topk", d_in=d, d_sae=m, k=k)
    tc = TrainConfig(total_tokens=n_steps * batch, warmup_steps=1, b_dec_init="mean", log_every=10**9)
    trainer = Trainer([RunSpec(cfg)], tc)
    times: list[float] = []
    last = [time.perf_counter()]

    def tick(_: Trainer) -> None:
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now

    trainer.fit(TensorSource(x, batch_size=batch), on_step=tick)
    dense_times = dense_reference_step_times(cfg, x, batch, n_steps) if args.dense else []
    ceilings.append(topk_ceilings(batch, d, m, k, args.ceiling_repeats))
    ceiling = best_of(ceilings)

    step = statistics.median(times[2:])  # after two warm-up steps
    tok_s = batch / step
    result: dict[str, Any] = {
        "benchmark": "train_topk",
        "d": d,
        "m": m,
        "k": k,
        "batch": batch,
        "steps_timed": len(times[2:]),
        "data": "random normal",
        "lmscope": {
            "tokens_per_s": round(tok_s, 1),
            "median_step_seconds": step,
            "step_seconds": times,
            "dense_flops_per_token": 2 * d * m,
            "dense_flops_per_s": tok_s * 2 * d * m,
            "fraction_of_matmul": round(tok_s / ceiling["matmul_tokens_per_s"], 4),
            "fraction_of_matmul_topk": round(tok_s / ceiling["matmul_topk_tokens_per_s"], 4),
        },
        "ceilings": ceiling,
        "ceiling_runs": ceilings,
        **run_info(),
    }
    if dense_times:
        ref = batch / statistics.median(dense_times[2:])
        result["dense_autograd_reference"] = {
            "tokens_per_s": round(ref, 1),
            "step_seconds": dense_times,
            "fraction_of_matmul_topk": round(ref / ceiling["matmul_topk_tokens_per_s"], 4),
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, result)

    c = ceiling
    print(f"threads {args.threads}  d {d}  m {m}  k {k}  batch {batch}")
    print(f"ceiling: addmm alone {c['matmul_tokens_per_s']:,.0f} tok/s ({c['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s)")
    print(f"ceiling: addmm + topk {c['matmul_topk_tokens_per_s']:,.0f} tok/s")
    lm = result["lmscope"]
    print(f"lmscope TopK training {tok_s:,.0f} tok/s ({step * 1e3:.0f} ms/step) = {lm['fraction_of_matmul']:.2f} of "
          f"the matmul, {lm['fraction_of_matmul_topk']:.2f} of matmul+topk")  # fmt: skip
    if dense_times:
        ref = result["dense_autograd_reference"]
        print(f"dense autograd reference {ref['tokens_per_s']:,.0f} tok/s = {ref['fraction_of_matmul_topk']:.2f} "
              "of matmul+topk")  # fmt: skip
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
