"""The two ceilings a TopK SAE training step is measured against (imported by train_throughput.py, train_topk.py).

Whatever else a TopK training step does, it must compute every pre-activation densely (the encoder forward,
`addmm(b_enc, x, W_enc)`: 2 * d * m FLOPs per token) and select the k largest per token. With a sparse backward
(lmscope's FusedTopK, sparsify's FusedEncoder) nothing else in the step is dense, so a step can approach, but never
beat, the time of that addmm followed by that topk on the same shapes. Both are timed here on the same shapes,
best of `repeats` (load from other jobs only adds time), alternating so drift hits both alike:

- `matmul_tokens_per_s`: batch / time of `torch.addmm(b, x, W)`, x [batch, d], W [d, m];
- `matmul_topk_tokens_per_s`: batch / time of the same addmm + `.topk(k, dim=1, sorted=False)`.

A training step's tokens/s divided by these is `fraction_of_matmul` and `fraction_of_matmul_topk`.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch


def topk_ceilings(batch: int, d: int, m: int, k: int, repeats: int = 10, seed: int = 0) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, d, generator=g)
    w = torch.randn(d, m, generator=g) / math.sqrt(d)
    b = torch.randn(m, generator=g) * 0.01

    def mm() -> None:
        torch.addmm(b, x, w)

    def mm_topk() -> None:
        torch.addmm(b, x, w).topk(k, dim=1, sorted=False)

    mm()  # warm-up: first-touch allocations, thread pool
    mm_topk()
    best_mm = best_topk = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        mm()
        best_mm = min(best_mm, time.perf_counter() - t)
        t = time.perf_counter()
        mm_topk()
        best_topk = min(best_topk, time.perf_counter() - t)
    return {
        "ops": f"torch.addmm(b[{m}], x[{batch}, {d}], W[{d}, {m}]); then .topk({k}, dim=1, sorted=False)",
        "repeats": repeats,
        "torch_threads": torch.get_num_threads(),
        "addmm_seconds": best_mm,
        "addmm_topk_seconds": best_topk,
        "matmul_tokens_per_s": round(batch / best_mm, 1),
        "matmul_topk_tokens_per_s": round(batch / best_topk, 1),
        "matmul_flops_per_s": 2 * batch * d * m / best_mm,
    }


def best_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The fastest of several ceiling measurements (each figure separately)."""
    return {
        "matmul_tokens_per_s": max(r["matmul_tokens_per_s"] for r in runs),
        "matmul_topk_tokens_per_s": max(r["matmul_topk_tokens_per_s"] for r in runs),
        "matmul_flops_per_s": max(r["matmul_flops_per_s"] for r in runs),
    }
