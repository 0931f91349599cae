"""Initialisation from data: the geometric median (or the mean) for `b_dec`, the mean-norm scale."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lmscope.dictionaries.base import Dictionary, DictionaryError


def geometric_median(points: Tensor, iters: int = 100, tol: float = 1e-6) -> Tensor:
    """Weiszfeld's algorithm: the point minimising the sum of Euclidean distances to `points` [N, d]."""
    x = points.double()
    median = x.mean(0)
    for _ in range(iters):
        dist = (x - median).norm(dim=1).clamp_min(1e-12)
        w = 1.0 / dist
        new = (w[:, None] * x).sum(0) / w.sum()
        if (new - median).norm() <= tol * max(1.0, float(median.norm())):
            median = new
            break
        median = new
    return median.to(points.dtype)


@torch.no_grad()
def init_b_dec(dictionary: Dictionary, target: Tensor, method: str) -> None:
    """Set `b_dec` from a batch of (normalised) targets: geometric_median, mean or zeros."""
    flat = target.reshape(-1, target.shape[-1])
    if method == "geometric_median":
        value = geometric_median(flat)
    elif method == "mean":
        value = flat.mean(0)
    elif method == "zeros":
        value = torch.zeros_like(dictionary.b_dec)
    else:
        raise DictionaryError(f"unknown b_dec init {method!r}; use geometric_median, mean or zeros")
    dictionary.b_dec.copy_(value.to(dictionary.b_dec))


def norm_scale(mean_norm: float, width: int) -> float:
    """The factor that makes activations' mean L2 norm sqrt(width) (SAELens' expected_average_only_in)."""
    if not mean_norm > 0 or not math.isfinite(mean_norm):
        raise DictionaryError(f"the activation source reports mean_norm={mean_norm}; it must be positive and finite")
    return math.sqrt(width) / mean_norm
