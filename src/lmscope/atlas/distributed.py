"""An atlas build over several processes (torchrun; gloo on CPU, nccl on GPU), merged exactly on rank 0.

Every rank reads the whole corpus in the same order (tokenising is cheap next to the model), runs the model and the
dictionary only on its share of the batches (batch i goes to rank i mod N, so every batch has the same contexts and
shape as in one process) and accumulates with global context ids. At the end rank 0 receives the other ranks'
accumulators and merges them (`FeatureAccumulator.merge`: exact), receives each batch's reconstruction moments and
co-firing sample and replays them in batch order (so the FVU and the co-firing neighbours equal one process's), and
writes the file alone; rank 0 also writes every context as it streams by. Only the activation sums (mean activation)
can differ from one process's, in float64 rounding.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from lmscope.atlas.accumulate import FeatureAccumulator

_DTYPES = [torch.float32, torch.float64, torch.int64, torch.int32, torch.bool, torch.float16, torch.bfloat16]
_HEADER = 8  # ndim, dtype code, up to 6 dimensions


def _send(tensors: list[Tensor], dst: int, device: torch.device) -> None:
    dist.send(torch.tensor([len(tensors)], dtype=torch.int64, device=device), dst)
    for t in tensors:
        if t.dim() > _HEADER - 2:
            raise ValueError(f"cannot send a {t.dim()}-dimensional tensor")
        head = [t.dim(), _DTYPES.index(t.dtype), *t.shape] + [0] * (_HEADER - 2 - t.dim())
        dist.send(torch.tensor(head, dtype=torch.int64, device=device), dst)
        if t.numel():
            dist.send(t.contiguous().to(device), dst)


def _recv(src: int, device: torch.device) -> list[Tensor]:
    n = torch.zeros(1, dtype=torch.int64, device=device)
    dist.recv(n, src)
    out = []
    for _ in range(int(n.item())):
        head = torch.zeros(_HEADER, dtype=torch.int64, device=device)
        dist.recv(head, src)
        ndim, code = int(head[0]), int(head[1])
        t = torch.empty([int(x) for x in head[2 : 2 + ndim]], dtype=_DTYPES[code], device=device)
        if t.numel():
            dist.recv(t, src)
        out.append(t)
    return out


def gather_to_main(tensors: list[Tensor], rank: int, world: int, device: torch.device) -> list[list[Tensor]] | None:
    """On rank 0, every rank's `tensors` (its own first); on the others, None after sending theirs."""
    if rank != 0:
        _send(tensors, 0, device)
        return None
    return [tensors] + [_recv(r, device) for r in range(1, world)]


def merge_accumulators(acc: FeatureAccumulator, rank: int, world: int) -> None:
    """Rank 0's `acc` becomes the merge of every rank's (the others send theirs)."""
    got = gather_to_main(acc.state(), rank, world, acc.device)
    if got is None:
        return
    for state in got[1:]:
        other = FeatureAccumulator.__new__(FeatureAccumulator)
        other.__dict__ = {**acc.__dict__}
        other.load_state(state)
        acc.merge(other)


def stack_chunks(chunks: list[tuple[int, list[Tensor]]], widths: list[int]) -> list[Tensor]:
    """Per-batch pieces (batch index, tensors) flattened for sending: the batch indices, each piece's lengths, and
    each field concatenated (`widths[j]` > 0: field j is [n, widths[j]] rows; 0: a 1-D field)."""
    idx = torch.tensor([i for i, _ in chunks], dtype=torch.int64)
    rows = [[t.numel() // w if w else t.numel() for t, w in zip(ts, widths, strict=True)] for _, ts in chunks]
    lens = torch.tensor(rows, dtype=torch.int64).reshape(len(chunks), len(widths))
    fields = []
    for j, w in enumerate(widths):
        parts = [ts[j].reshape(-1, w) if w else ts[j].reshape(-1) for _, ts in chunks]
        fields.append(torch.cat([x.cpu() for x in parts]) if parts else torch.zeros((0, w) if w else (0,)))
    return [idx, lens, *fields]


def unstack_chunks(flat: list[Tensor]) -> list[tuple[int, list[Tensor]]]:
    idx, lens, *fields = flat
    out: list[tuple[int, list[Tensor]]] = []
    offs = [0] * len(fields)
    for c in range(len(idx)):
        ts = []
        for j, f in enumerate(fields):
            n = int(lens[c, j])
            ts.append(f[offs[j] : offs[j] + n])
            offs[j] += n
        out.append((int(idx[c]), ts))
    return out
