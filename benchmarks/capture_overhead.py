"""Tokens/s of a plain Hugging Face forward pass vs the same pass under `capture` of 4 hooks.

Both run side by side in one process, interleaved round by round on the same batch, so machine noise
hits both alike. Also measures early stopping: capturing layer 5 only. Writes JSON.

    python benchmarks/capture_overhead.py [--model smollm2-135m] [--batch 8] [--context 128] [--rounds 7]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

import lmscope
from lmscope import load_model


def stdlib_text(n_chars: int) -> str:
    """Real text: Python standard library source files, in a fixed order."""
    root = Path(os.__file__).parent
    out, total = [], 0
    for path in sorted(root.glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        out.append(text)
        total += len(text)
        if total >= n_chars:
            break
    return "\n".join(out)


def timed(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--out", default="benchmarks/results/capture_overhead.json")
    args = ap.parse_args()

    torch.manual_seed(0)
    model = load_model(args.model, device=args.device, dtype=args.dtype)
    n = args.batch * args.context
    ids = model.encode(stdlib_text(20 * n))[0, :n].reshape(args.batch, args.context).to(model.device)
    last = model.n_layers - 1
    hooks = [f"blocks.{i}.resid_post" for i in (0, last // 3, 2 * last // 3, last)]
    sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)

    def plain() -> None:
        with torch.no_grad():
            model.hf(input_ids=ids, use_cache=False)
        sync()

    def captured() -> None:
        with model.capture(hooks, stop_early=False):
            model(ids)
        sync()

    def plain_to_layer5() -> None:
        with model.capture(["blocks.5.resid_post"]):
            model(ids)
        sync()

    def capture_layer5_full() -> None:
        with model.capture(["blocks.5.resid_post"], stop_early=False):
            model(ids)
        sync()

    for fn in (plain, captured):  # warm-up
        fn()
    times: dict[str, list[float]] = {"plain": [], "capture_4_hooks": [], "layer5_early": [], "layer5_full": []}
    order = [
        ("plain", plain),
        ("capture_4_hooks", captured),
        ("layer5_early", plain_to_layer5),
        ("layer5_full", capture_layer5_full),
    ]
    for r in range(args.rounds):
        # Alternate the order every round so slow drift of a shared machine cancels out.
        for name, fn in order if r % 2 == 0 else reversed(order):
            times[name].append(timed(fn))
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "benchmark": "capture_overhead",
        "model": args.model,
        "device": str(model.device),
        "dtype": str(model.dtype),
        "torch_threads": torch.get_num_threads(),
        "batch": args.batch,
        "context": args.context,
        "tokens_per_pass": n,
        "rounds": args.rounds,
        "hooks": hooks,
        "tokens_per_s": {k: n / v for k, v in med.items()},
        "median_seconds": med,
        "capture_overhead_pct": 100.0 * (med["capture_4_hooks"] / med["plain"] - 1.0),
        "early_stop_speedup_layer5": med["layer5_full"] / med["layer5_early"],
        "target": "capture overhead under 3%",
        "lmscope_version": lmscope.__version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(out)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
