"""Each row's k largest values, exactly, in a few cheap passes instead of one `torch.topk` over the whole row.

On a CPU, for float32, where core/native.py's C kernels are built (the machine has a C compiler), one C loop per
row does it: running maxima give a threshold no larger than the k-th value, the elements above it are gathered,
and a heap keeps the k largest (4 ms at 4,096 x 4,608, k 32, on 2 cores, against 20 ms for the blocks below and 40
for torch.topk). Otherwise, and on other devices and dtypes, blocks:

A TopK dictionary selects k of d_sae pre-activations per token (32 of 4,608, say); after the encoder matmul that
selection is the largest part of a training step. `torch.topk` on a CPU walks every element of every row through a
(value, index) heap, whatever k is. Here each row is cut into blocks of `bs` elements, block j holding the latents
j, j + nb, j + 2 nb, ... (nb = d_sae / bs blocks; strided so that the block maxima are one vectorised max over bs
contiguous slices of nb). The k largest values of a row lie in the k blocks with the largest maxima: an element
outside those blocks is at most its own block's maximum, which at least k other blocks' maxima (each a distinct
element) reach, so at least k elements are at least as large. A `torch.topk` over the nb block maxima finds those
blocks, and one over their k * bs elements finds the values. With bs near sqrt(d_sae / k) both are over roughly
2 sqrt(k d_sae) elements instead of d_sae (768 instead of 4,608 at k = 32). Any valid top k of the block maxima
will do (ties included), so the nb maxima can be selected the same way in turn: `block_plan` picks two levels of
blocks where they fit (4 x 6 at 4,608 / 32: three torch.topk calls over 192, 192 and 128 elements).

The result is the set `torch.topk(x, k, sorted=False)` returns: the same values; where several elements tie at the
k-th value, possibly other indices among them (any choice is a valid top k). NaN counts as the largest value, as in
`torch.topk`. Rows too short for blocks to pay (under 1,024 elements, or fewer than 4 k blocks) go to `torch.topk`
itself.
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import Any

import torch
from torch import Tensor

from lmscope.core import native

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


def block_plan(width: int, k: int) -> tuple[int, ...]:
    """The block sizes `top_k` uses on rows of `width`, outermost first.

    () means torch.topk; (bs,) two passes; (bs1, bs2) three: the nb1 = width / bs1 block maxima are themselves
    selected in blocks of bs2 (the same argument, one level up), so the three torch.topk calls run over about
    3 k (width / k)^(1/3) elements instead of 2 sqrt(k width). Measured on 2 CPU threads (4,096 rows of 4,608, k 32):
    torch.topk 39 ms, two passes 24 ms, three 20 ms; the three-pass plan was faster at every width and k tried
    (2,048 to 65,536 wide, k 32 to 128), by 7 to 28%. It is used where block sizes near (width / k)^(1/3) divide
    the width and leave at least MIN_BLOCKS_PER_K * k outer blocks; otherwise the two-pass plan, if any.
    """
    bs = block_size(width, k)
    if bs is None:
        return ()
    target = (width / k) ** (1 / 3)
    best: tuple[float, int, int] | None = None
    sizes = range(max(2, math.ceil(target / 2)), int(2 * target) + 1)
    for b1 in sizes:
        if width % b1:
            continue
        for b2 in sizes:
            if (width // b1) % b2 or width // (b1 * b2) < MIN_BLOCKS_PER_K * k:
                continue
            score = abs(math.log(b1 / target)) + abs(math.log(b2 / target))
            if best is None or score < best[0]:
                best = (score, b1, b2)
    return (best[1], best[2]) if best is not None else (bs,)


def top_k(x: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(values, indices) of the k largest elements of each row of x (last dimension), in no particular order.

    Gradients flow to the selected values as they do through torch.topk's.
    """
    width = x.shape[-1]
    k = min(int(k), width)
    if k >= 1 and x.numel() and x.dtype == torch.float32 and x.device.type == "cpu" and width < 2**31:
        lib = native.library()
        if lib is not None:  # one C pass per row (core/native.py)
            lead = x.shape[:-1]
            rows = x.detach().reshape(-1, width).contiguous()
            vals, idx = native_top_k(lib, rows, k)
            if x.requires_grad:  # the values through autograd, as torch.topk's
                vals = x.reshape(-1, width).gather(1, idx)
            return vals.reshape(*lead, k), idx.reshape(*lead, k)
    plan = block_plan(width, k)
    if not plan or x.numel() == 0 or not x.dtype.is_floating_point:
        return x.topk(k, dim=-1, sorted=False)
    lead = x.shape[:-1]
    rows = x.reshape(-1, width)
    if not rows.is_contiguous():
        rows = rows.contiguous()
    vals, idx = _select(rows, k, plan)
    return vals.reshape(*lead, k), idx.reshape(*lead, k)


_ROWS_PER_THREAD = 64  # below this many rows a thread costs more than it saves


def native_top_k(lib: Any, rows: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The C kernel of core/native.py on contiguous float32 `rows` [n, width], split over torch's thread count."""
    n, width = rows.shape
    vals = torch.empty(n, k, dtype=torch.float32)
    idx = torch.empty(n, k, dtype=torch.int64)
    if lib.lmscope_openmp():  # on torch's own OpenMP threads (see core/native.py)
        threads = max(1, min(torch.get_num_threads(), n // _ROWS_PER_THREAD))
        if lib.lmscope_topk(rows.data_ptr(), n, width, k, vals.data_ptr(), idx.data_ptr(), threads) != 0:
            raise MemoryError(f"the top-k kernel could not allocate its scratch ({width + 16} floats a thread)")
        return vals, idx
    parts = max(1, min(torch.get_num_threads(), n // _ROWS_PER_THREAD))
    bounds = [n * i // parts for i in range(parts + 1)]
    # per thread: candidate values and positions, with room for a whole vector stored past the last candidate
    scratch = [(torch.empty(width + 16), torch.empty(width + 16, dtype=torch.int32)) for _ in range(parts)]
    ptrs = (vals.data_ptr(), idx.data_ptr())
    calls = [
        functools.partial(lib.lmscope_topk_rows, rows.data_ptr(), a, b, width, k, *ptrs, bv.data_ptr(), bi.data_ptr())
        for (a, b), (bv, bi) in zip(itertools.pairwise(bounds), scratch, strict=True)
    ]
    native.run_parallel(calls)
    return vals, idx


def _select(rows: Tensor, k: int, plan: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """top k of each row of the contiguous [n, width] `rows`, through the blocks of `plan` (see block_plan)."""
    if not plan:
        return rows.topk(k, dim=1, sorted=False)
    bs = plan[0]
    n, nb = rows.shape[0], rows.shape[1] // bs
    blocks = rows.view(n, bs, nb)  # blocks[:, r, j] = rows[:, r * nb + j], element r of block j
    with torch.no_grad():  # [n, k] the blocks with the largest maxima (selected in blocks themselves, per plan)
        chosen = _select(blocks.amax(1), k, plan[1:])[1]
    cand = blocks.gather(2, chosen.unsqueeze(1).expand(n, bs, k))  # [n, bs, k] their elements
    vals, at = cand.reshape(n, bs * k).topk(k, dim=1, sorted=False)
    r = at.div(k, rounding_mode="floor")
    idx = chosen.gather(1, at - r * k) + r * nb
    return vals, idx
