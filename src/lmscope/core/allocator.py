"""glibc's malloc, set up for tensors of a few to tens of megabytes that are freed and allocated again every step.

A training step on a CPU frees and reallocates its gradients and temporaries (10 MB each at d=576, m=4608) every
step. glibc's defaults serve such blocks from fresh `mmap`s or hand the freed top of the heap back to the kernel
(its trim threshold follows the mmap threshold, which it raises to the largest block freed, up to 32 MB), so the
next step faults the same pages in again: measured 10-20 ms of a 220 ms TopK step (docs/benchmarks.md). Fixing
the two thresholds keeps those blocks in the process's heap instead:

- `M_MMAP_THRESHOLD` 64 MiB: blocks below it come from the heap, larger ones (a store's shuffle buffer, a model's
  weights) still from their own mappings, which go back to the kernel when freed;
- `M_TRIM_THRESHOLD` 512 MiB: the heap keeps up to that much freed memory at its top for reuse.

The cost is memory: the process keeps up to 512 MiB it no longer uses. Only glibc on Linux is touched, once per
process; `LMSCOPE_MALLOC=default` leaves the allocator alone, and a threshold already set through glibc's own
environment variables (`MALLOC_MMAP_THRESHOLD_`, `MALLOC_TRIM_THRESHOLD_`) is respected.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 64 << 20
TRIM_THRESHOLD = 512 << 20

_state: dict[str, bool] = {}


def keep_freed_blocks() -> bool:
    """Set glibc's mmap and trim thresholds for step-sized tensors (see the module); True when they were set.

    Called by the trainer before it trains on a CPU. Idempotent; a no-op off Linux/glibc, under
    `LMSCOPE_MALLOC=default`, or for a threshold the environment already sets.
    """
    if "done" in _state:
        return _state["done"]
    _state["done"] = False
    if not sys.platform.startswith("linux") or os.environ.get("LMSCOPE_MALLOC", "").lower() == "default":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018  (only glibc has it)
    except (OSError, AttributeError):
        return False
    ok = True
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        ok = bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and ok
    if "MALLOC_TRIM_THRESHOLD_" not in os.environ:
        ok = bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)) and ok
    _state["done"] = ok
    return ok
