"""Shared by the anchor training scripts (stdlib + torch + safetensors only: runs in either venv)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import torch
from safetensors.torch import load_file


def train_args(doc: str | None) -> argparse.Namespace:
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
    args = ap.parse_args()
    if args.lr is None:
        args.lr = 2e-4 / (args.d_sae / 2**14) ** 0.5
    return args


def load_acts(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    """(train rows, held-out eval rows) of the activation file; train is cut to whole batches."""
    x = load_file(args.acts)["acts"].float()
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
