"""The TopK training step of a git revision against the working tree's, alternating on the same batches (JSON).

    .venv/bin/python benchmarks/train_step_ab.py [--ref 4edad9b] [--steps 20] [--threads 2]

Each variant is a full step as the trainer runs it: `FusedTopK` forward and backward, the MSE, the decoder-gradient
projection (`remove_parallel_grad`), gradient clipping, fused Adam, the decoder renormalisation and the step's FVU for
the log, on d=576, m=4608, k=32, batch 4096 of random rows. The revision's `lmscope/dictionaries/sparse_decode.py`
and `metrics.py` are read with `git show` and imported on their own; its projection is the one written out below
(the code of `Dictionary.remove_parallel_grad` up to 381caa0), and its log FVU is what the trainer computed up to
4edad9b (`fvu(x, recon)` on float64 copies, after forming the AuxK residual `x - recon` whether or not any latent
was dead); the working tree's is `fvu_from_sse` on the loss's squared error. The two steps alternate (which goes
first alternates too), so load from other jobs hits both; the first two steps of each are dropped. Reports the
median step times, their ratio and the largest loss difference, then (`parts`) the working tree's step timed part
by part over `--steps` more steps (median ms each). Writes benchmarks/results/train_step_ab.json.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from _gitref import module_at
from _runinfo import run_info
from lmscope.core.atomic import atomic_write_json
from lmscope.dictionaries import DictConfig, build
from lmscope.dictionaries.metrics import fvu_from_sse
from lmscope.dictionaries.sparse_decode import fused_topk

ROOT = Path(__file__).resolve().parent


def old_projection(d: Any) -> None:
    with torch.no_grad():
        w = d.W_dec / d.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8)
        g = d.W_dec.grad
        g.sub_((g * w).sum(1, keepdim=True) * w)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ref", default="4edad9b", help="the git revision to compare with")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "train_step_ab.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ref = module_at(args.ref, "src/lmscope/dictionaries/sparse_decode.py", "ref_sparse_decode")
    ref_metrics = module_at(args.ref, "src/lmscope/dictionaries/metrics.py", "ref_metrics")
    d_in, m, k, b = 576, 4608, 32, 4096
    x_all = torch.randn(args.steps * b, d_in, generator=torch.Generator().manual_seed(0))

    def make() -> tuple[Any, torch.optim.Optimizer]:
        d = build(DictConfig(arch="topk", d_in=d_in, d_sae=m, k=k), seed=0)
        return d, torch.optim.Adam(d.parameters(), lr=1e-4, fused=True)

    def ref_log(x: torch.Tensor, recon: torch.Tensor, mse: torch.Tensor) -> float:
        (x - recon).detach()  # the AuxK residual the loss formed before it checked for dead latents
        return float(ref_metrics.fvu(x, recon.detach()))

    def tree_log(x: torch.Tensor, recon: torch.Tensor, mse: torch.Tensor) -> float:
        return float(fvu_from_sse(mse.detach().double() * x.shape[0], x))

    PARTS = ("forward", "backward", "projection", "clip", "adam", "zero_grad", "renormalise", "log_fvu")

    def step(d: Any, opt: torch.optim.Optimizer, x: torch.Tensor, fused: Callable, project: Callable,
             log: Callable, parts: dict[str, list[float]] | None = None) -> float:  # fmt: skip
        marks = [time.perf_counter()]
        recon, _vals, _idx = fused(x, d.W_enc, d.b_enc, d.W_dec, d.b_dec, k, True)
        loss = (recon - x).pow(2).sum(-1).mean()
        marks.append(time.perf_counter())
        loss.backward()
        marks.append(time.perf_counter())
        project(d)
        marks.append(time.perf_counter())
        torch.nn.utils.clip_grad_norm_(d.parameters(), 1.0)
        marks.append(time.perf_counter())
        opt.step()
        marks.append(time.perf_counter())
        opt.zero_grad(set_to_none=True)
        marks.append(time.perf_counter())
        d.post_step()
        marks.append(time.perf_counter())
        log(x, recon, loss)
        marks.append(time.perf_counter())
        if parts is not None:
            for name, a, c in zip(PARTS, marks[:-1], marks[1:], strict=True):
                parts[name].append(c - a)
        return float(loss.detach())

    variants = {
        "ref": (*make(), ref.fused_topk, old_projection, ref_log),
        "tree": (*make(), fused_topk, lambda d: d.remove_parallel_grad(), tree_log),
    }
    times: dict[str, list[float]] = {n: [] for n in variants}
    losses: dict[str, list[float]] = {n: [] for n in variants}
    for i in range(args.steps):
        x = x_all[i * b : (i + 1) * b]
        order = list(variants) if i % 2 else list(variants)[::-1]
        for n in order:
            d, opt, fused, project, log = variants[n]
            t = time.perf_counter()
            losses[n].append(step(d, opt, x, fused, project, log))
            times[n].append(time.perf_counter() - t)
    med = {n: statistics.median(ts[2:]) for n, ts in times.items()}
    parts: dict[str, list[float]] = {name: [] for name in PARTS}
    d, opt, fused, project, log = variants["tree"]
    for i in range(args.steps):
        step(d, opt, x_all[i * b : (i + 1) * b], fused, project, log, parts if i >= 2 else None)
    parts_ms = {name: round(1000 * statistics.median(ts), 2) for name, ts in parts.items()}
    out = {
        "benchmark": "train_step_ab",
        "ref": args.ref,
        "steps": args.steps,
        "threads": args.threads,
        "median_step_seconds": med,
        "speedup": med["ref"] / med["tree"],
        "max_loss_difference": max(abs(a - c) for a, c in zip(losses["ref"], losses["tree"], strict=True)),
        "max_relative_loss_difference": max(
            abs(a - c) / max(abs(a), 1e-30) for a, c in zip(losses["ref"], losses["tree"], strict=True)
        ),
        "losses": losses,
        "step_seconds": times,
        "parts_median_ms": parts_ms,
        **run_info(),
    }
    atomic_write_json(args.out, out)
    print(f"{args.ref}: {1000 * med['ref']:.0f} ms  working tree: {1000 * med['tree']:.0f} ms  "
          f"speed-up {out['speedup']:.2f}x  max |loss difference| {out['max_loss_difference']:.1e} "
          f"(relative {out['max_relative_loss_difference']:.1e})")  # fmt: skip
    print("working tree, part by part (median ms): " + ", ".join(f"{n} {v:.1f}" for n, v in parts_ms.items()))


if __name__ == "__main__":
    main()
