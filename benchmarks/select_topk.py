"""The top-k of a TopK step three ways: the C kernel (core/native.py), the torch blocks, torch.topk (JSON).

    .venv/bin/python benchmarks/select_topk.py [--rows 4096] [--repeats 20] [--threads 2]

Each shape (width, k) is timed on the same random float32 rows [rows, width]: `lmscope.dictionaries.select.top_k`
with the kernel built (`native_ms`), the blocked torch path it falls back to (`blocked_ms`, where a block plan
exists), and `torch.topk(x, k, sorted=False)` (`torch_topk_ms`); the three alternate within each repeat, and each
figure is the median over repeats after two untimed ones. Every result is checked to be torch.topk's set. Writes
benchmarks/results/select_topk.json.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from _runinfo import run_info
from lmscope.core import native
from lmscope.core.atomic import atomic_write_json
from lmscope.dictionaries.select import _select, block_plan, native_top_k

ROOT = Path(__file__).resolve().parent
SHAPES = [(4608, 32), (16384, 64), (4608, 128), (2048, 16), (65536, 32)]


def same_set(x: torch.Tensor, vals: torch.Tensor, k: int) -> bool:
    ref = x.topk(k, dim=1).values.sort(dim=1).values
    return bool(torch.equal(vals.sort(dim=1).values, ref))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "select_topk.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lib = native.library()
    if lib is None:
        raise SystemExit("the C kernels are not built here (no C compiler, or LMSCOPE_NATIVE=0): nothing to compare")
    shapes: list[dict[str, Any]] = []
    for width, k in SHAPES:
        x = torch.randn(args.rows, width, generator=torch.Generator().manual_seed(width + k))
        plan = block_plan(width, k)
        ways: dict[str, Callable[[], tuple[torch.Tensor, torch.Tensor]]] = {
            "native": lambda x=x, k=k: native_top_k(lib, x, k),
            "torch_topk": lambda x=x, k=k: x.topk(k, dim=1, sorted=False),
        }
        if plan:
            ways["blocked"] = lambda x=x, k=k, plan=plan: _select(x, k, plan)
        times: dict[str, list[float]] = {w: [] for w in ways}
        for r in range(args.repeats + 2):
            for name, f in ways.items():
                t = time.perf_counter()
                vals, _idx = f()
                dt = time.perf_counter() - t
                if r >= 2:
                    times[name].append(dt)
                if r == 0 and not same_set(x, vals, k):
                    raise SystemExit(f"{name} at width {width}, k {k} is not torch.topk's set")
        ms = {f"{name}_ms": round(1000 * statistics.median(v), 3) for name, v in times.items()}
        shapes.append({"width": width, "k": k, "block_plan": list(plan), **ms})
        print(f"width {width:6d} k {k:4d}: " + ", ".join(f"{n} {v:.1f}" for n, v in ms.items()))
    out = {
        "benchmark": "select_topk",
        "rows": args.rows,
        "repeats": args.repeats,
        "threads": args.threads,
        "simd": bool(lib.lmscope_topk_simd()),
        "shapes": shapes,
        **run_info(),
    }
    atomic_write_json(args.out, out)


if __name__ == "__main__":
    main()
