"""The two ceilings a TopK SAE training step is measured against (imported by train_throughput.py, train_topk.py).

Whatever else a TopK training step does, it must compute every pre-activation densely (the encoder forward,
`addmm(b_enc, x, W_enc)`: 2 * d * m FLOPs per token) and select the k largest per token. With a sparse backward
(lmscope's FusedTopK, sparsify's FusedEncoder) nothing else in the step is dense, so a step can approach, but never
beat, the time of that addmm followed by that topk on the same shapes. Both are timed here on the same shapes,
best of `repeats` (load from other jobs only adds time), alternating so drift hits both alike:

- `matmul_tokens_per_s`: batch / time of `torch.addmm(b, x, W, out=P)`, x [batch, d], W [d, m];
- `matmul_topk_tokens_per_s`: batch / time of the same addmm + `torch.topk(P, k, dim=1, sorted=False, out=...)`.

Both write into buffers allocated once (`out=`): on a CPU a fresh [batch, m] result each call costs page faults
worth a sixth of the addmm (measured on the 2-core machine), work a training step need not do (lmscope's step reuses
its pre-activation buffer). The figures with fresh results are kept as `*_fresh_*` for comparison with the
ceilings quoted before 2026-11-30, which were those.

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

    pre = torch.empty(batch, m)
    vals, idx = torch.empty(batch, k), torch.empty(batch, k, dtype=torch.long)

    def mm() -> None:
        torch.addmm(b, x, w, out=pre)

    def mm_topk() -> None:
        torch.addmm(b, x, w, out=pre)
        torch.topk(pre, k, dim=1, sorted=False, out=(vals, idx))

    def mm_fresh() -> None:
        torch.addmm(b, x, w)

    def mm_topk_fresh() -> None:
        torch.addmm(b, x, w).topk(k, dim=1, sorted=False)

    fns = {"mm": mm, "topk": mm_topk, "mm_fresh": mm_fresh, "topk_fresh": mm_topk_fresh}
    for f in fns.values():  # warm-up: first-touch allocations, thread pool
        f()
    best = dict.fromkeys(fns, math.inf)
    for _ in range(repeats):
        for name, f in fns.items():
            t = time.perf_counter()
            f()
            best[name] = min(best[name], time.perf_counter() - t)
    return {
        "ops": f"torch.addmm(b[{m}], x[{batch}, {d}], W[{d}, {m}], out=P); then torch.topk(P, {k}, dim=1, "
        "sorted=False, out=...)",
        "repeats": repeats,
        "torch_threads": torch.get_num_threads(),
        "addmm_seconds": best["mm"],
        "addmm_topk_seconds": best["topk"],
        "matmul_tokens_per_s": round(batch / best["mm"], 1),
        "matmul_topk_tokens_per_s": round(batch / best["topk"], 1),
        "matmul_flops_per_s": 2 * batch * d * m / best["mm"],
        "matmul_fresh_tokens_per_s": round(batch / best["mm_fresh"], 1),
        "matmul_topk_fresh_tokens_per_s": round(batch / best["topk_fresh"], 1),
    }


def best_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The fastest of several ceiling measurements (each figure separately)."""
    return {
        "matmul_tokens_per_s": max(r["matmul_tokens_per_s"] for r in runs),
        "matmul_topk_tokens_per_s": max(r["matmul_topk_tokens_per_s"] for r in runs),
        "matmul_flops_per_s": max(r["matmul_flops_per_s"] for r in runs),
        "matmul_fresh_tokens_per_s": max(r.get("matmul_fresh_tokens_per_s", 0.0) for r in runs),
        "matmul_topk_fresh_tokens_per_s": max(r.get("matmul_topk_fresh_tokens_per_s", 0.0) for r in runs),
    }
