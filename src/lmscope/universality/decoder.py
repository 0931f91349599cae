"""Decoder cosine: how closely two dictionaries' features point the same way in the space they write to.

Row i of W_dec is the direction feature i writes. Two dictionaries of one model (other seeds, widths, or
neighbouring layers of the residual stream, which share a basis) can be compared by the cosine of their rows. The
baseline keeps B's own geometry (every cosine among B's features) but turns it by a random rotation of the space:
what the same matching finds between A and a dictionary shaped like B that shares no direction with A by design.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor


def unit_rows(w: Tensor) -> Tensor:
    """Rows scaled to unit norm (float32 on CPU); a zero row stays zero (cosine 0 with everything)."""
    w = w.detach().float().cpu()
    return w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)


def random_rotation(d: int, seed: int) -> Tensor:
    """A Haar-random orthogonal d x d matrix (QR of a Gaussian matrix, signs fixed), reproducible from `seed`."""
    g = torch.Generator().manual_seed(int(seed) + 0x5EED)
    q, r = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r)).unsqueeze(0)).float()


def cosine_blocks(a: Tensor, b: Tensor, rows: int) -> Iterator[tuple[int, np.ndarray]]:
    """Row blocks of the cosine matrix of A's and B's decoder rows ([m_a, d] and [m_b, d]), `rows` at a time."""
    ua, ub = unit_rows(a), unit_rows(b)
    for s in range(0, ua.shape[0], rows):
        yield s, (ua[s : s + rows] @ ub.T).numpy()


def rotated(b: Tensor, seed: int) -> Tensor:
    """B's decoder rows turned by a random rotation (the shuffled baseline)."""
    return unit_rows(b) @ random_rotation(b.shape[1], seed)
