"""Which process am I: torch.distributed's process group as torchrun describes it (gloo on CPU, nccl on GPU).

The layers that split heavy work over ranks (harvest, atlas, training) share these; without torchrun's variables
everything is a no-op and the rank is 0 of 1.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
from types import TracebackType

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def init_from_env(device: str = "auto") -> torch.device:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR...); nccl on GPU, gloo on CPU.

    Without torchrun's variables this is a no-op returning the device to use.
    """
    use_cuda = torch.cuda.is_available() and device in ("auto", "cuda")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu" if device == "auto" else device)
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1 and not is_distributed():
        if use_cuda:
            torch.cuda.set_device(dev)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        _note_uncaught_exceptions()
        atexit.register(shutdown)
    return dev


_failed = False  # an exception reached the top level of this process (so its peers may never reach the barrier)


def _note_uncaught_exceptions() -> None:
    previous = sys.excepthook

    def hook(kind: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
        global _failed
        _failed = True
        previous(kind, value, tb)

    sys.excepthook = hook


def shutdown() -> None:
    """Leave the process group cleanly (registered at exit by `init_from_env`).

    A process that exits with its gloo group alive lets C++ destroy still-joinable worker threads, which aborts
    ("terminate called without an active exception") and turns a finished run into a failed one under torchrun. The
    ranks first meet at a barrier, so none tears its connections down while a peer may still be finishing its last
    collective (skipped after an uncaught exception: torchrun stops the other ranks then).
    """
    if not is_distributed():
        return
    if not _failed:
        with contextlib.suppress(RuntimeError):  # a peer is gone already: leave anyway
            dist.barrier()
    dist.destroy_process_group()


def all_reduce_sum(t: Tensor) -> Tensor:
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_gather_cat(t: Tensor) -> Tensor:
    """Every rank's `t` (the same shape on all), concatenated along dim 0 in rank order; `t` itself without torchrun."""
    if not is_distributed():
        return t
    parts = [torch.empty_like(t) for _ in range(world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)
