"""Data-parallel helpers over torch.distributed: DDP does the gradient all-reduce, nothing home-made.

Every rank reads the same global batch from its source and keeps its own contiguous slice; DDP averages the
gradients, so N ranks with global batch B take the same steps as one process with batch B. The process-group
helpers live in core/distributed.py (harvest and atlas builds use them too) and are re-exported here.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lmscope.core.distributed import (
    all_reduce_sum,
    barrier,
    init_from_env,
    is_distributed,
    is_main,
    rank,
    shutdown,
    world_size,
)
from lmscope.errors import LmscopeError


class DistributedError(LmscopeError):
    """A torch.distributed setup problem."""


__all__ = ["DistributedError", "all_reduce_sum", "barrier", "init_from_env", "is_distributed", "is_main", "rank",
           "shard", "shutdown", "world_size", "wrap"]  # fmt: skip


def shard(batch: Tensor) -> Tensor:
    """This rank's contiguous slice of a global batch (which must split evenly)."""
    n = world_size()
    if n == 1:
        return batch
    if batch.shape[0] % n:
        raise DistributedError(
            f"a global batch of {batch.shape[0]} tokens does not split evenly over {n} ranks; "
            f"use a batch size divisible by {n}"
        )
    return batch.tensor_split(n)[rank()]


def wrap(module: nn.Module, device: torch.device) -> nn.Module:
    """DDP around `module` when distributed, the module itself otherwise."""
    if not is_distributed():
        return module
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=ids)
