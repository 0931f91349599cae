"""Sparse decoding: x_hat = sum_j vals[:, j] * W_dec[idx[:, j]], without a dense [tokens, d_sae] matmul.

A TopK dictionary has k active latents per token out of d_sae (32 of 4608, say). A dense decoder costs
2 * d_sae * d_out FLOPs per token forward and twice that backward; the sparse one costs 2 * k * d_out. The
autograd Function below computes in backward only what is needed: the gradient of the k active values
(one dot product each) and the decoder gradient for the rows that were used (an index_add); the encoder's
gradient then flows from the scattered value gradient through an ordinary dense matmul.
"""

from __future__ import annotations

import warnings
import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lmscope.core import native
from lmscope.dictionaries.select import top_k

_CHUNK = 1024  # tokens per gather in backward: bounds the [chunk, k, d] buffer

# The [tokens, d_sae] pre-activation buffer of each encoder weight's training steps, reused from step to step: a
# fresh 75 MB tensor a step (4096 x 4608 fp32) costs page faults on a CPU that rival the top-k. Keyed weakly by the
# weight (by id, dropped when the weight is freed: a tensor cannot be a WeakKeyDictionary key, as its == is
# elementwise), so it goes when the dictionary does.
_PRE_BUFFERS: dict[int, Tensor] = {}


def _pre_buffer(w_enc: Tensor, n: int) -> Tensor:
    shape = (n, w_enc.shape[1])
    key = id(w_enc)
    buf = _PRE_BUFFERS.get(key)
    if buf is None or buf.shape != shape or buf.dtype != w_enc.dtype or buf.device != w_enc.device:
        if buf is None:
            weakref.finalize(w_enc, _PRE_BUFFERS.pop, key, None)
        buf = torch.empty(shape, dtype=w_enc.dtype, device=w_enc.device)
        _PRE_BUFFERS[key] = buf
    return buf


class SparseDecode(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, vals: Tensor, idx: Tensor, weight: Tensor) -> Tensor:
        ctx.save_for_backward(vals, idx, weight)
        return F.embedding_bag(idx, weight, per_sample_weights=vals, mode="sum")

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, Tensor | None]:
        vals, idx, weight = ctx.saved_tensors
        grad = grad.contiguous()
        grad_vals = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_vals = value_grads(grad, weight, idx)
        if ctx.needs_input_grad[2]:
            grad_weight = torch.sparse.mm(_coo_t(idx, vals, weight.shape[0]), grad)
        return grad_vals, None, grad_weight


def value_grads(grad: Tensor, weight: Tensor, idx: Tensor) -> Tensor:
    """[N, k]: <grad[n], weight[idx[n, j]]>, without a dense [N, d_sae] product."""
    n, k = idx.shape
    op = getattr(torch.ops.aten, "_embedding_bag_per_sample_weights_backward", None)
    if op is not None and idx.numel() > 0:  # embedding_bag's own fused kernel (no [N, k, d] buffer)
        offsets = torch.arange(0, n * k, k, device=idx.device)
        bags = torch.arange(n, device=idx.device).repeat_interleave(k)
        return op(grad, weight, idx.reshape(-1), offsets, bags, 0, -1).reshape(n, k)
    out = torch.empty(n, k, dtype=grad.dtype, device=grad.device)
    for s in range(0, n, _CHUNK):
        rows = F.embedding(idx[s : s + _CHUNK], weight)  # [c, k, d]
        out[s : s + _CHUNK] = torch.bmm(rows, grad[s : s + _CHUNK].unsqueeze(-1)).squeeze(-1)
    return out


def sparse_decode(vals: Tensor, idx: Tensor, weight: Tensor) -> Tensor:
    """[N, k] values at [N, k] latent indices through `weight` [d_sae, d_out] -> [N, d_out] (no bias)."""
    return SparseDecode.apply(vals, idx, weight)


def dense_decode(vals: Tensor, idx: Tensor, weight: Tensor) -> Tensor:
    """The reference: scatter to dense latents, then a dense matmul."""
    z = torch.zeros(vals.shape[0], weight.shape[0], dtype=vals.dtype, device=vals.device)
    return z.scatter_add(1, idx, vals) @ weight


def _coo_t(idx: Tensor, values: Tensor, n_latents: int) -> Tensor:
    """The transpose [d_sae, N] of the sparse latent matrix whose row n holds `values[n]` at `idx[n]`."""
    n, k = idx.shape
    rows = torch.arange(n, device=idx.device).repeat_interleave(k)
    indices = torch.stack([idx.reshape(-1), rows])
    return torch.sparse_coo_tensor(indices, values.reshape(-1), (n_latents, n), check_invariants=False)


_TRANSPOSE_BLOCK = 256  # latents per block of the transposed copy


def _transpose(a: Tensor) -> Tensor:
    """a.T, contiguous, copied in blocks of rows: a whole-matrix strided copy of the [d_sae, d] encoder gradient
    misses the cache on every element and takes several times longer."""
    rows, cols = a.shape
    out = torch.empty(cols, rows, dtype=a.dtype, device=a.device)
    for s in range(0, rows, _TRANSPOSE_BLOCK):
        out[:, s : s + _TRANSPOSE_BLOCK].copy_(a[s : s + _TRANSPOSE_BLOCK].T)
    return out


class _ByLatent:
    """The [d_sae, N] transpose of a k-per-token sparse matrix in CSR form, sorted by latent once per step.

    The decoder gradient (values x output gradient) and the encoder gradient (value gradients x input) have the same
    sparsity pattern; sorting the (latent, token) pairs once and building both as CSR matrices lets the product run
    on torch's multi-threaded CSR kernel, where a COO product sorts (coalesces) its own copy and runs on one thread.
    """

    def __init__(self, idx: Tensor, n_latents: int) -> None:
        n, k = idx.shape
        self.shape = (n_latents, n)
        flat = idx.reshape(-1)
        if flat.dtype == torch.int64 and flat.device.type == "cpu" and self._counting_sort(flat, k, n_latents):
            return
        # a stable sort keeps each latent's tokens in order (sorted CSR columns); on int32 keys it is twice as fast
        keys = flat.to(torch.int32) if n_latents < 2**31 else flat
        self.order = torch.argsort(keys, stable=True)
        counts = torch.bincount(flat, minlength=n_latents)
        self.crow = torch.zeros(n_latents + 1, dtype=torch.long, device=idx.device)
        torch.cumsum(counts, 0, out=self.crow[1:])
        self.tokens = self.order.div(k, rounding_mode="floor")

    def _counting_sort(self, flat: Tensor, k: int, n_latents: int) -> bool:
        """The same order, crow and tokens in one C counting sort (core/native.py); False where it is not built."""
        lib = native.library()
        if lib is None:
            return False
        flat = flat.contiguous()
        self.crow = torch.empty(n_latents + 1, dtype=torch.long)
        self.order = torch.empty_like(flat)
        self.tokens = torch.empty_like(flat)
        cursor = torch.empty(n_latents, dtype=torch.long)
        ptrs = (self.crow.data_ptr(), self.order.data_ptr(), self.tokens.data_ptr(), cursor.data_ptr())
        if lib.lmscope_by_latent(flat.data_ptr(), flat.numel(), k, n_latents, *ptrs) != 0:
            raise ValueError(f"a latent index outside [0, {n_latents}) reached the sparse backward")
        return True

    def mm(self, values: Tensor, dense: Tensor) -> Tensor:
        """[d_sae, d]: sum over tokens n of values[n, j] * dense[n] into row idx[n, j]."""
        with warnings.catch_warnings():  # torch says once per process that CSR support is in beta
            warnings.simplefilter("ignore", UserWarning)
            a = torch.sparse_csr_tensor(
                self.crow, self.tokens, values.reshape(-1)[self.order], self.shape, check_invariants=False
            )
        return a @ dense


class FusedTopK(torch.autograd.Function):
    """A whole TopK autoencoder step: pre = x W_enc + b, top-k, ReLU, sparse decode.

    Backward never forms a dense [N, d_sae] tensor: the k value gradients per token are sampled dot products,
    the decoder gradient touches only the active rows, and the encoder gradient is a sparse-dense product
    (2 k d FLOPs per token instead of the 2 d_sae d of a dense matmul). What remains dense is the forward
    encoder matmul.
    """

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, w_enc: Tensor, b_enc: Tensor, w_dec: Tensor, b_dec: Tensor, k: int, center: bool
    ) -> tuple[Tensor, Tensor, Tensor]:
        # centred, x - b_dec is what the encoder reads; saved for backward, it gives the encoder gradient directly
        x = x - b_dec if center else x
        if x.dtype == w_enc.dtype and x.device == w_enc.device:
            pre = torch.addmm(b_enc, x, w_enc, out=_pre_buffer(w_enc, x.shape[0]))
        else:  # let addmm refuse or promote as it would
            pre = torch.addmm(b_enc, x, w_enc)
        vals, idx = top_k(pre, k)  # torch.topk's set, in a few cheaper passes (dictionaries/select.py)
        del pre
        vals.clamp_min_(0.0)
        recon = F.embedding_bag(idx, w_dec, per_sample_weights=vals, mode="sum") + b_dec
        ctx.save_for_backward(x, w_enc, w_dec, vals, idx)
        ctx.center = center
        ctx.mark_non_differentiable(vals, idx)
        return recon, vals, idx

    @staticmethod
    def backward(ctx: Any, grad: Tensor, _gv: Tensor, _gi: Tensor) -> tuple[Tensor | None, ...]:
        x, w_enc, w_dec, vals, idx = ctx.saved_tensors
        grad = grad.contiguous()
        m = w_dec.shape[0]
        need_we, need_wd = ctx.needs_input_grad[1], ctx.needs_input_grad[3]
        g_we = g_wd = None
        # On a CPU both sparse products go through one latent-sorted CSR pattern (torch's CSR product is
        # multi-threaded, its COO product sorts its own copy and runs on one thread); elsewhere through COO products.
        by_latent = _ByLatent(idx, m) if grad.device.type == "cpu" and (need_wd or need_we) else None
        fused = _fused_backward(by_latent, vals, grad, x, w_enc, w_dec, need_wd, need_we)
        if fused is not None:  # one C pass for the value, decoder, encoder and encoder-bias gradients
            g_vals, g_wd, g_we, g_pre_sum = fused
            return _rest_of_backward(ctx, grad, w_enc, idx, g_vals, g_pre_sum, g_we, g_wd)
        if need_wd:
            g_wd = by_latent.mm(vals, grad) if by_latent is not None else torch.sparse.mm(_coo_t(idx, vals, m), grad)
        g_vals = value_grads(grad, w_dec, idx) * (vals > 0)  # zero where the ReLU clipped
        g_pre_sum = torch.zeros(m, dtype=grad.dtype, device=grad.device).index_add_(
            0, idx.reshape(-1), g_vals.reshape(-1)
        )
        if need_we:  # x is the encoder's input as saved: x - b_dec when centred
            if by_latent is not None:
                g_we = _transpose(by_latent.mm(g_vals, x))
            else:
                g_we = torch.sparse.mm(_coo_t(idx, g_vals, m), x).T.contiguous()
        return _rest_of_backward(ctx, grad, w_enc, idx, g_vals, g_pre_sum, g_we, g_wd)


def _rest_of_backward(
    ctx: Any, grad: Tensor, w_enc: Tensor, idx: Tensor, g_vals: Tensor, g_pre_sum: Tensor, g_we: Tensor | None,
    g_wd: Tensor | None,
) -> tuple[Tensor | None, ...]:  # fmt: skip
    """The gradients of the biases and of the input, from the value gradients; FusedTopK.backward's tuple."""
    need_x, _we, need_be, _wd, need_bd = ctx.needs_input_grad[:5]
    g_x = g_be = g_bd = None
    if need_be:
        g_be = g_pre_sum
    if need_bd:
        g_bd = grad.sum(0)
        if ctx.center:
            g_bd = g_bd - w_enc @ g_pre_sum
    if need_x:
        g_x = torch.sparse.mm(_coo_t(idx, g_vals, w_enc.shape[1]).t(), w_enc.T)
    return g_x, g_we, g_be, g_wd, g_bd, None, None


def _fused_backward(
    by_latent: _ByLatent | None, vals: Tensor, grad: Tensor, x: Tensor, w_enc: Tensor, w_dec: Tensor,
    need_wd: bool, need_we: bool,
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor] | None:  # fmt: skip
    """(value gradients [N, k], decoder gradient, encoder gradient, encoder-bias gradient) from core/native.py's
    one-pass kernel, where it is built and the tensors suit it (float32 CPU, contiguous); else None."""
    if by_latent is None:
        return None
    tensors = (vals, grad, x, w_enc, w_dec)
    if any(t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous() for t in tensors):
        return None
    lib = native.library()
    if lib is None:
        return None
    m, d = w_dec.shape
    n, d_in = x.shape
    if w_enc.shape != (d_in, m) or grad.shape != (n, d) or vals.shape[0] != n:
        return None
    g_vals = torch.empty_like(vals)
    g_pre_sum = torch.empty(m, dtype=torch.float32)
    g_wd = torch.empty(m, d, dtype=torch.float32) if need_wd else None
    g_we = torch.empty(d_in, m, dtype=torch.float32) if need_we else None
    out_ptrs = [t.data_ptr() if t is not None else None for t in (g_vals, g_wd, g_we, g_pre_sum)]
    status = lib.lmscope_topk_backward(
        by_latent.crow.data_ptr(), by_latent.order.data_ptr(), by_latent.tokens.data_ptr(), m, vals.data_ptr(),
        grad.data_ptr(), x.data_ptr(), w_dec.data_ptr(), d, d_in, *out_ptrs, torch.get_num_threads(),
    )  # fmt: skip
    if status != 0:
        raise MemoryError(f"the sparse backward could not allocate its scratch ({16 * d_in} floats a thread)")
    return g_vals, g_wd, g_we, g_pre_sum


def fused_topk(
    x: Tensor, w_enc: Tensor, b_enc: Tensor, w_dec: Tensor, b_dec: Tensor, k: int, center: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """(reconstruction [N, d_out], values [N, k], indices [N, k]) with the sparse backward of FusedTopK."""
    return FusedTopK.apply(x, w_enc, b_enc, w_dec, b_dec, k, center)
