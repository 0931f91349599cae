"""Each row's k largest values, exactly, in two cheap passes instead of one `torch.topk` over the whole row.

A TopK dictionary selects k of d_sae pre-activations per token (32 of 4,608, say); after the encoder matmul that
selection is the largest part of a training step. `torch.topk` on a CPU walks every element of every row through a
(value, index) heap, whatever k is. Here each row is cut into blocks of `bs` elements, block j holding the latents
j, j + nb, j + 2 nb, ... (nb = d_sae / bs blocks; strided so that the block maxima are one vectorised max over bs
contiguous slices of nb). The k largest values of a row lie in the k blocks with the largest maxima: an element
outside those blocks is at most its own block's maximum, which at least k other blocks' maxima (each a distinct
element) reach, so at least k elements are at least as large. A `torch.topk` over the nb block maxima finds those
blocks, and one over their k * bs elements finds the values. With bs near sqrt(d_sae / k) both are over roughly
2 sqrt(k d_sae) elements instead of d_sae (768 instead of 4,608 at k = 32).

The result is the set `torch.topk(x, k, sorted=False)` returns: the same values; where several elements tie at the
k-th value, possibly other indices among them (any choice is a valid top k). NaN counts as the largest value, as in
`torch.topk`. Rows too short for blocks to pay (under 1,024 elements, or fewer than 4 k blocks) go to `torch.topk`
itself.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

MIN_BLOCKS_PER_K = 4  # below nb = 4 k blocks, the two passes cost about as much as one topk: use torch.topk
MIN_WIDTH = 1024  # on shorter rows the extra calls cost more than the selection they save


def block_size(width: int, k: int) -> int | None:
    """The block size for rows of `width` and this k: a divisor of `width` near sqrt(width / k) leaving at least
    MIN_BLOCKS_PER_K * k blocks, or None when no such divisor exists (then `top_k` uses torch.topk)."""
    if k < 1 or width < max(MIN_WIDTH, 2 * MIN_BLOCKS_PER_K * k):
        return None
    target = math.sqrt(width / k)
    best: int | None = None
    for bs in range(2, int(2 * target) + 2):
        if width % bs or width // bs < MIN_BLOCKS_PER_K * k:
            continue
        if best is None or abs(math.log(bs / target)) < abs(math.log(best / target)):
            best = bs
    if best is None or not 0.5 <= best / target <= 2.0:
        return None
    return best


def top_k(x: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(values, indices) of the k largest elements of each row of x (last dimension), in no particular order.

    Gradients flow to the selected values as they do through torch.topk's.
    """
    width = x.shape[-1]
    k = min(int(k), width)
    bs = block_size(width, k)
    if bs is None or x.numel() == 0 or not x.dtype.is_floating_point:
        return x.topk(k, dim=-1, sorted=False)
    lead = x.shape[:-1]
    rows = x.reshape(-1, width)
    if not rows.is_contiguous():
        rows = rows.contiguous()
    n, nb = rows.shape[0], width // bs
    blocks = rows.view(n, bs, nb)  # blocks[:, r, j] = rows[:, r * nb + j], element r of block j
    with torch.no_grad():
        chosen = blocks.amax(1).topk(k, dim=1, sorted=False).indices  # [n, k] the blocks with the largest maxima
    cand = blocks.gather(2, chosen.unsqueeze(1).expand(n, bs, k))  # [n, bs, k] their elements
    vals, at = cand.reshape(n, bs * k).topk(k, dim=1, sorted=False)
    r = at.div(k, rounding_mode="floor")
    idx = chosen.gather(1, at - r * k) + r * nb
    return vals.reshape(*lead, k), idx.reshape(*lead, k)
