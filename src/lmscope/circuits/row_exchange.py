"""Attribution rows over several processes (torchrun): each rank computes every N-th batch of rows and every rank
receives all of them, in batch order, so each holds the same graph as one process would.

A round of row batches is split by batch index (batch c on rank c mod N). A row travels as what the graph keeps of
it: its node, the columns and values of its kept edges, and what the per-row edge cap dropped. Each rank broadcasts
its pieces in turn (gloo on CPU, nccl on GPU); the receivers reassemble them by batch, then by row. Rows do not
depend on which batch slot computed them (each is one copy's gradient through the same forward graph), so a graph
built over N ranks equals the one-process graph.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

Piece = tuple[int, Tensor, Tensor, tuple[float, float, int] | None]  # node, columns, values, dropped (abs, sum, n)


def _pack(batches: dict[int, list[Piece]]) -> list[Tensor]:
    cs = sorted(batches)
    head = [[c, len(batches[c])] for c in cs]
    rows = [(node, len(cols), *(drop if drop is not None else (float("nan"), 0.0, -1))) for c in cs
            for node, cols, _v, drop in batches[c]]  # fmt: skip
    cols = [p[1].reshape(-1).to(torch.int64) for c in cs for p in batches[c]]
    vals = [p[2].reshape(-1).to(torch.float32) for c in cs for p in batches[c]]
    return [
        torch.tensor(head, dtype=torch.int64).reshape(-1, 2),
        torch.tensor([[r[0], r[1], r[4]] for r in rows], dtype=torch.int64).reshape(-1, 3),
        torch.tensor([[r[2], r[3]] for r in rows], dtype=torch.float64).reshape(-1, 2),
        torch.cat(cols) if cols else torch.zeros(0, dtype=torch.int64),
        torch.cat(vals) if vals else torch.zeros(0, dtype=torch.float32),
    ]


def _unpack(t: list[Tensor]) -> dict[int, list[Piece]]:
    head, meta, drops, cols, vals = (x.cpu() for x in t)
    out: dict[int, list[Piece]] = {}
    r = o = 0
    for c, n in head.tolist():
        lst: list[Piece] = []
        for _ in range(n):
            node, length, n_drop = meta[r].tolist()
            drop = None if n_drop < 0 else (float(drops[r, 0]), float(drops[r, 1]), int(n_drop))
            lst.append((int(node), cols[o : o + length], vals[o : o + length], drop))
            r += 1
            o += length
        out[int(c)] = lst
    return out


def _broadcast(tensors: list[Tensor] | None, src: int, device: torch.device) -> list[Tensor]:
    """`tensors` from rank `src` to every rank (shapes first, then the data)."""
    dtypes = [torch.int64, torch.int64, torch.float64, torch.int64, torch.float32]
    shapes = torch.zeros(len(dtypes), 2, dtype=torch.int64, device=device)
    if tensors is not None:
        for i, t in enumerate(tensors):
            shapes[i, : t.dim()] = torch.tensor(t.shape)
            if t.dim() == 1:
                shapes[i, 1] = -1
    dist.broadcast(shapes, src)
    out = []
    for i, dt in enumerate(dtypes):
        a, b = shapes[i].tolist()
        shape = [a] if b == -1 else [a, b]
        t = tensors[i].to(device).contiguous() if tensors is not None else torch.empty(shape, dtype=dt, device=device)
        if t.numel():
            dist.broadcast(t, src)
        out.append(t)
    return out


def exchange(mine: dict[int, list[Piece]], rank: int, world: int, device: torch.device) -> dict[int, list[Piece]]:
    """Every rank's pieces (batch index -> its rows' pieces), on every rank."""
    every: dict[int, list[Piece]] = {}
    for src in range(world):
        got = _broadcast(_pack(mine) if src == rank else None, src, device)
        every.update(mine if src == rank else _unpack(got))
    return every
