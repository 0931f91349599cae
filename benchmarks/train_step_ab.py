"""The TopK training step of a git revision against the working tree's, alternating on the same batches (JSON).

    .venv/bin/python benchmarks/train_step_ab.py [--ref 86b7ceb] [--steps 20] [--threads 2] [--old-step]

Each variant is a full step as the trainer runs it: `FusedTopK` forward and backward, the MSE, the decoder-gradient
projection, gradient clipping, fused Adam, the decoder renormalisation and the step's FVU for the log, on d=576,
m=4608, k=32, batch 4096 of random rows. The revision's `lmscope/dictionaries/sparse_decode.py` and `metrics.py`
are read with `git show` and imported on their own. Its projection, clipping and log FVU are the trainer's of
86b7ceb (`remove_parallel_grad`'s torch ops, `clip_grad_norm_` then the step, `fvu_from_sse`), or with `--old-step`
the trainer's before 381caa0 / 4edad9b (the projection written out below; `fvu(x, recon)` on float64 copies, after
forming the AuxK residual `x - recon` whether or not any latent was dead). The working tree's is
`Trainer._train_step`'s: `remove_parallel_grad` (its C kernel returns the squared norm) and `clipped_step`. The two
steps alternate (which goes first alternates too), so load from other jobs hits both; the first two steps of each
are dropped. Reports the median step times, their ratio and the largest loss difference, then (`parts`) the working
tree's step timed part by part over `--steps` more steps (median ms each). Writes
benchmarks/results/train_step_ab.json.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from _gitref import module_at
from _runinfo import run_info
from lmscope.core.allocator import keep_freed_blocks
from lmscope.core.atomic import atomic_write_json
from lmscope.dictionaries import DictConfig, build
from lmscope.dictionaries.metrics import fvu_from_sse
from lmscope.dictionaries.sparse_decode import fused_topk
from lmscope.training.clipping import clipped_step

ROOT = Path(__file__).resolve().parent


def torch_projection(d: Any) -> None:
    """`Dictionary.remove_parallel_grad` up to 86b7ceb (its torch path now)."""
    with torch.no_grad():
        w, g = d.W_dec, d.W_dec.grad
        sq = torch.linalg.vector_norm(w, dim=1).square_().clamp_min_(1e-16)
        g.addcmul_(w, (g * w).sum(1).div_(sq).unsqueeze(1), value=-1)


def old_projection(d: Any) -> None:
    with torch.no_grad():
        w = d.W_dec / d.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8)
        g = d.W_dec.grad
        g.sub_((g * w).sum(1, keepdim=True) * w)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ref", default="86b7ceb", help="the git revision to compare with")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--old-step", action="store_true", help="the ref's projection and log FVU of before 381caa0")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "train_step_ab.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_blocks()  # as the trainer does (core/allocator.py): step-sized tensors stay in the heap
    ref = module_at(args.ref, "src/lmscope/dictionaries/sparse_decode.py", "ref_sparse_decode")
    ref_metrics = module_at(args.ref, "src/lmscope/dictionaries/metrics.py", "ref_metrics")
    d_in, m, k, b = 576, 4608, 32, 4096
    x_all = torch.randn(args.steps * b, d_in, generator=torch.Generator().manual_seed(0))

    def make() -> tuple[Any, torch.optim.Optimizer]:
        d = build(DictConfig(arch="topk", d_in=d_in, d_sae=m, k=k), seed=0)
        return d, torch.optim.Adam(d.parameters(), lr=1e-4, fused=True)

    def ref_log(x: torch.Tensor, recon: torch.Tensor, mse: torch.Tensor) -> float:
        if not args.old_step:
            return float(ref_metrics.fvu_from_sse(mse.detach().double() * x.shape[0], x))
        (x - recon).detach()  # the AuxK residual the loss formed before it checked for dead latents
        return float(ref_metrics.fvu(x, recon.detach()))

    def tree_log(x: torch.Tensor, recon: torch.Tensor, mse: torch.Tensor) -> float:
        return float(fvu_from_sse(mse.detach().double() * x.shape[0], x))

    def ref_update(d: Any, opt: torch.optim.Optimizer, mark: Callable[[str], None]) -> None:
        (old_projection if args.old_step else torch_projection)(d)
        mark("projection")
        torch.nn.utils.clip_grad_norm_(d.parameters(), 1.0)
        mark("clip")
        opt.step()
        mark("adam")

    def tree_update(d: Any, opt: torch.optim.Optimizer, mark: Callable[[str], None]) -> None:
        # as Trainer._train_step: the projection hands its squared norm to the clipped step
        dec_sq = d.remove_parallel_grad()
        mark("projection")
        clipped_step(opt, list(d.parameters()), 1.0, {id(d.W_dec): dec_sq} if dec_sq is not None else None)
        mark("clip_and_adam")

    def step(d: Any, opt: torch.optim.Optimizer, x: torch.Tensor, fused: Callable, update: Callable,
             log: Callable, parts: dict[str, list[float]] | None = None) -> float:  # fmt: skip
        marks = [("start", time.perf_counter())]

        def mark(name: str) -> None:
            marks.append((name, time.perf_counter()))

        recon, _vals, _idx = fused(x, d.W_enc, d.b_enc, d.W_dec, d.b_dec, k, True)
        loss = (recon - x).pow(2).sum(-1).mean()
        mark("forward")
        loss.backward()
        mark("backward")
        update(d, opt, mark)
        opt.zero_grad(set_to_none=True)
        mark("zero_grad")
        d.post_step()
        mark("renormalise")
        log(x, recon, loss)
        mark("log_fvu")
        if parts is not None:
            for (_, a), (name, c) in itertools.pairwise(marks):
                parts.setdefault(name, []).append(c - a)
        return float(loss.detach())

    variants = {
        "ref": (*make(), ref.fused_topk, ref_update, ref_log),
        "tree": (*make(), fused_topk, tree_update, tree_log),
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
    parts: dict[str, list[float]] = {}
    d, opt, fused, project, log = variants["tree"]
    for i in range(args.steps):
        step(d, opt, x_all[i * b : (i + 1) * b], fused, project, log, parts if i >= 2 else None)
    parts_ms = {name: round(1000 * statistics.median(ts), 2) for name, ts in parts.items()}
    out = {
        "benchmark": "train_step_ab",
        "ref": args.ref,
        "ref_step": "before 381caa0" if args.old_step else "86b7ceb",
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
