"""Fraction of variance unexplained (FVU): the one definition, for a batch and for a stream of batches.

    FVU = sum |y - y_hat|^2 / sum |y - mean(y)|^2

over every token (rows) and dimension (columns), with mean(y) the per-dimension mean over the tokens. `fvu`
computes it on one batch; `FVUAccumulator` on many, batch by batch, and gives the same figure as `fvu` on the
concatenated data. Both sum in float64 (float32 on devices without it, e.g. MPS), and the total variance is
summed about the mean, never as sum(y^2) - n mean^2: batches are merged with Chan et al.'s pairwise update,
so a large offset in the activations does not cancel the variance away. The trainer, `training.evaluate` and
the atlas build all use these two.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lmscope.core import native

EPS = 1e-12  # floor of the total variance: a constant target has FVU sse / EPS, not a division by zero


def _accumulation_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


def _rows(t: Tensor) -> Tensor:
    return t.reshape(-1, t.shape[-1]).to(_accumulation_dtype(t.device))


def batch_moments(target: Tensor, recon: Tensor) -> tuple[int, Tensor, Tensor, Tensor]:
    """(n, sse, mean [d], m2): token count, squared error, per-dimension mean and squared deviation about it."""
    t, r = _rows(target), _rows(recon)
    if t.shape != r.shape:
        raise ValueError(f"target and reconstruction differ in shape: {list(target.shape)} vs {list(recon.shape)}")
    mean = t.mean(0)
    return t.shape[0], (t - r).pow(2).sum(), mean, (t - mean).pow(2).sum()


def fvu(target: Tensor, recon: Tensor) -> Tensor:
    """FVU of one batch ([..., d] each), as a 0-dim tensor on the inputs' device (differentiable in `recon`)."""
    _n, sse, _mean, m2 = batch_moments(target, recon)
    return sse / m2.clamp_min(EPS)


def fvu_from_sse(sse: Tensor | float, target: Tensor) -> Tensor:
    """A training step's FVU from the squared error its loss already summed (the MSE term times the tokens).

    Only the target's spread about its mean is summed here, each row's squares in the activations' precision
    (float32 at least) and the rows in float64, without the float64 copy of the batch that `fvu` makes: a
    fiftieth of the cost on a 4096 x 576 batch, and within about 1e-7 of `fvu` (the loss's float32 squared
    error sets the precision). The trainer logs it each step; evaluation uses `fvu` / `FVUAccumulator`.
    """
    t = target.reshape(-1, target.shape[-1])
    t = t if t.dtype in (torch.float32, torch.float64) else t.float()
    acc = _accumulation_dtype(t.device)
    if t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous() and t.numel() > 0:
        lib = native.library()  # the same sums in two passes of one C loop, without the centred copy
        if lib is not None:
            m2c = lib.lmscope_centred_sumsq(t.data_ptr(), t.shape[0], t.shape[1], torch.get_num_threads())
            if m2c != -1.0:
                return torch.as_tensor(sse, dtype=acc) / max(m2c, EPS)
    n = t.shape[0]
    mean = t.sum(0).to(acc) / max(n, 1)
    centre = mean.to(t.dtype)
    # about the rounded mean c, corrected by sum |t - mean|^2 = sum |t - c|^2 - n |mean - c|^2
    m2 = (t - centre).square_().sum(-1).to(acc).sum() - n * (mean - centre.to(acc)).pow(2).sum()
    return torch.as_tensor(sse, dtype=acc, device=t.device) / m2.clamp_min(EPS)


class FVUAccumulator:
    """FVU over a stream: `update(target, recon)` per batch, then `value()`; equal to `fvu` on all of it.

    The sums stay on the device of the first batch (no host sync per batch); `value()`, `sse` and
    `total_variance` read them back.
    """

    def __init__(self) -> None:
        self.n = 0  # tokens seen
        self._sse: Tensor | None = None
        self._mean: Tensor | None = None
        self._m2: Tensor | None = None

    @torch.no_grad()
    def update(self, target: Tensor, recon: Tensor) -> FVUAccumulator:
        """Add a batch: target and reconstruction [..., d] (the leading dimensions are tokens)."""
        return self.add_moments(*batch_moments(target.detach(), recon.detach()))

    def add_moments(self, n_b: int, sse_b: Tensor, mean_b: Tensor, m2_b: Tensor) -> FVUAccumulator:
        """Add a batch given by its `batch_moments` (how batches computed elsewhere, e.g. on other ranks, are
        replayed in order: the result is the same as updating with the batches themselves)."""
        if n_b == 0:
            return self
        if self._sse is None or self._mean is None or self._m2 is None:
            self.n, self._sse, self._mean, self._m2 = n_b, sse_b, mean_b, m2_b
            return self
        if mean_b.shape != self._mean.shape:
            raise ValueError(f"batch width {mean_b.shape[0]} differs from the earlier batches' {self._mean.shape[0]}")
        dev, dtype = self._mean.device, self._mean.dtype
        sse_b, mean_b, m2_b = sse_b.to(dev, dtype), mean_b.to(dev, dtype), m2_b.to(dev, dtype)
        n = self.n + n_b
        delta = mean_b - self._mean
        self._m2 = self._m2 + m2_b + delta.pow(2).sum() * (self.n * n_b / n)
        self._mean = self._mean + delta * (n_b / n)
        self._sse = self._sse + sse_b
        self.n = n
        return self

    @property
    def sse(self) -> float:
        """Sum of squared reconstruction errors over every token and dimension."""
        return float(self._sse) if self._sse is not None else 0.0

    @property
    def total_variance(self) -> float:
        """Sum of squared deviations of the targets from their per-dimension mean."""
        return float(self._m2) if self._m2 is not None else 0.0

    def value(self) -> float:
        """The FVU of everything seen so far (NaN before the first token)."""
        if self.n == 0:
            return float("nan")
        return self.sse / max(self.total_variance, EPS)
