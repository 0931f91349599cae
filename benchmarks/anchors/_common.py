"""Shared by the anchor training scripts and train_throughput.py (stdlib + numpy + torch: runs in either venv)."""

from __future__ import annotations

import argparse
import json
import math
import struct
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

CONVERGED_REL_CHANGE = 0.02  # FVU over the last 10% of steps may fall by less than this (relative) to count


def train_args(doc: str | None, extra: Any = None) -> argparse.Namespace:
    """The options every anchor trainer takes; `extra(parser)` adds a library's own."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--acts", required=True, help="safetensors file with 'acts' [N, d] float32")
    ap.add_argument("--train-tokens", type=int, required=True, help="rows [0, train-tokens) are trained on, in order")
    ap.add_argument("--eval-tokens", type=int, default=16_384, help="the last rows, held out for the final FVU")
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--d-sae", type=int, default=4608)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--lr", type=float, default=None, help="default 2e-4 / sqrt(d_sae / 2^14)")
    ap.add_argument("--warmup-steps", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--serve", action="store_true", help="one step per line read on stdin (see StepGate)")
    if extra is not None:
        extra(ap)
    args = ap.parse_args()
    if args.lr is None:
        args.lr = 2e-4 / (args.d_sae / 2**14) ** 0.5
    return args


_NP_DTYPES = {"F32": np.float32, "F16": np.float16}


def open_acts(path: str | Path) -> torch.Tensor:
    """The "acts" tensor [N, d] of a safetensors file, memory-mapped (copy-on-write, so zero-copy).

    Every process that maps the file shares the OS page cache, so the three trainers of train_throughput.py
    hold one copy of the rows between them, not three (2M rows x 576 x fp32 is 4.6 GB)."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        meta = json.loads(f.read(n))["acts"]
    start, _end = meta["data_offsets"]
    arr = np.memmap(path, dtype=_NP_DTYPES[meta["dtype"]], mode="c", offset=8 + n + start, shape=tuple(meta["shape"]))
    return torch.from_numpy(arr)


def write_acts(path: str | Path, batches: Iterable[torch.Tensor], n_rows: int, d: int) -> None:
    """Stream the first `n_rows` rows of `batches` (fp32 [*, d] tensors) into a safetensors file holding one
    tensor "acts" [n_rows, d], without holding them in memory. Raises if the batches hold fewer rows."""
    header = json.dumps({"acts": {"dtype": "F32", "shape": [n_rows, d], "data_offsets": [0, n_rows * d * 4]}})
    raw = header.encode() + b" " * (-len(header) % 8)  # the spec allows trailing spaces; keeps data 8-aligned
    written = 0
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for b in batches:
            b = b[: n_rows - written].to(torch.float32).contiguous()
            f.write(b.numpy().tobytes())
            written += b.shape[0]
            if written >= n_rows:
                break
    if written < n_rows:
        Path(path).unlink()
        raise ValueError(f"only {written} rows to write, fewer than the {n_rows} asked")


def load_acts(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    """(train rows, held-out eval rows) of the activation file, memory-mapped; train is cut to whole batches."""
    x = open_acts(args.acts)
    if x.dtype != torch.float32:
        x = x.float()  # a copy; benchmark files are fp32
    if args.train_tokens + args.eval_tokens > x.shape[0]:
        raise SystemExit(f"{args.acts} has {x.shape[0]} rows; need train {args.train_tokens} + eval {args.eval_tokens}")
    n = args.train_tokens // args.batch_size * args.batch_size
    return x[:n], x[x.shape[0] - args.eval_tokens :]


def fvu(x: torch.Tensor, recon: torch.Tensor) -> float:
    """Fraction of variance unexplained over all rows: sum |x - x_hat|^2 / sum |x - mean(x)|^2."""
    return float((x - recon).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


class StepGate:
    """Times training steps; with `serve`, runs each step only when the caller asks, to interleave processes.

    Serve protocol: after setup print {"ready": true}; then per line read on stdin run one step and print
    {"step": i, "seconds": s}; the final JSON object follows the last step (or EOF on stdin).
    """

    def __init__(self, serve: bool) -> None:
        self.serve = serve
        self.seconds: list[float] = []
        self._t = 0.0

    def ready(self) -> None:
        if self.serve:
            print(json.dumps({"ready": True}), flush=True)

    def start(self) -> None:
        if self.serve:
            sys.stdin.readline()  # "" at EOF: run on without waiting
        self._t = time.perf_counter()

    def stop(self) -> None:
        self.seconds.append(time.perf_counter() - self._t)
        if self.serve:
            print(json.dumps({"step": len(self.seconds), "seconds": self.seconds[-1]}), flush=True)


def convergence(step_fvu: list[float], frac: float = 0.1) -> dict[str, Any]:
    """Is the training FVU still falling at the end? Over the last `frac` of the steps (at least 2), the relative
    drop from the mean of its first half to the mean of its second half; `converged` when under 2%.

    The per-step FVU is each batch's, measured in the forward pass before that step's update; every batch is new
    (one epoch), so it is an online held-out figure, the same for every library."""
    n = len(step_fvu)
    w = max(2, math.ceil(frac * n))
    if n < 2:
        return {"steps": n, "window_steps": n, "rel_change": None, "converged": False}
    tail = step_fvu[-w:]
    a, b = tail[: len(tail) // 2], tail[len(tail) // 2 :]
    mean_a, mean_b = sum(a) / len(a), sum(b) / len(b)
    rel = (mean_a - mean_b) / mean_b if mean_b else None
    return {
        "steps": n,
        "window_steps": len(tail),
        "fvu_window_mean": sum(tail) / len(tail),
        "fvu_window_first_half": mean_a,
        "fvu_window_second_half": mean_b,
        "rel_change": rel,
        "threshold": CONVERGED_REL_CHANGE,
        "converged": rel is not None and abs(rel) < CONVERGED_REL_CHANGE,
    }


def rate(seconds: list[float], batch_size: int) -> float:
    """Tokens/s over steps 2..N (step 1 carries setup and first-touch costs, so it is excluded for every library)."""
    if len(seconds) < 2:
        return float("nan")
    return (len(seconds) - 1) * batch_size / sum(seconds[1:])


def report(result: dict[str, Any]) -> None:
    result["torch"] = torch.__version__
    result["torch_threads"] = torch.get_num_threads()
    result["date"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    print(json.dumps(result), flush=True)
