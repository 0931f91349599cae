"""Intervention primitives for `Model.intervene`: each returns a function `activation -> activation`.

Activations have shape [..., seq, width]. `positions` (an int, a list of ints or a slice over the
sequence axis of the current forward call) limits an edit to some positions; None edits all of them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lmscope.errors import HookError
from lmscope.model.hooks import Writer

Positions = int | slice | Sequence[int] | None


def _finite(name: str, value: float) -> float:
    value = float(value)
    if not torch.isfinite(torch.tensor(value)):
        raise HookError(f"{name} must be a finite number, got {value}")
    return value


def _vector(name: str, v: torch.Tensor) -> torch.Tensor:
    v = torch.as_tensor(v)
    if v.ndim != 1:
        raise HookError(f"{name} must be a 1-D vector over the hook's width, got shape {tuple(v.shape)}")
    if not torch.isfinite(v).all():
        raise HookError(f"{name} contains NaN or infinite values")
    return v


def _at(positions: Positions, x: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    if positions is None:
        return new
    out = x.clone()
    index = list(positions) if isinstance(positions, Sequence) else positions
    out[..., index, :] = new[..., index, :]
    return out


def _check_width(x: torch.Tensor, v: torch.Tensor, name: str) -> None:
    if x.shape[-1] != v.shape[-1]:
        raise HookError(f"{name} has width {v.shape[-1]} but the hooked activation has width {x.shape[-1]}")


def add(vector: torch.Tensor, scale: float = 1.0, positions: Positions = None) -> Writer:
    """x + scale * vector (activation addition, the basis of steering)."""
    vector = _vector("vector", vector)
    scale = _finite("scale", scale)

    def write(x: torch.Tensor) -> torch.Tensor:
        _check_width(x, vector, "vector")
        return _at(positions, x, x + scale * vector.to(x.device, x.dtype))

    return write


def scale(factor: float, positions: Positions = None) -> Writer:
    """factor * x."""
    factor = _finite("factor", factor)

    def write(x: torch.Tensor) -> torch.Tensor:
        return _at(positions, x, x * factor)

    return write


def clamp_direction(direction: torch.Tensor, value: float, positions: Positions = None) -> Writer:
    """Set the coefficient of x along the unit direction to `value`, leaving the orthogonal part alone."""
    direction = _vector("direction", direction)
    norm = direction.norm()
    if norm == 0:
        raise HookError("direction is the zero vector; a clamp needs a non-zero direction")
    unit = direction / norm
    value = _finite("value", value)

    def write(x: torch.Tensor) -> torch.Tensor:
        _check_width(x, unit, "direction")
        u = unit.to(x.device, x.dtype)
        coef = x @ u
        return _at(positions, x, x + (value - coef).unsqueeze(-1) * u)

    return write


def zero_ablate(positions: Positions = None) -> Writer:
    """Replace the activation with zeros."""

    def write(x: torch.Tensor) -> torch.Tensor:
        return _at(positions, x, torch.zeros_like(x))

    return write


def mean_ablate(mean: torch.Tensor, positions: Positions = None) -> Writer:
    """Replace the activation with a mean activation (a vector over the width, e.g. from a corpus)."""
    mean = _vector("mean", mean)

    def write(x: torch.Tensor) -> torch.Tensor:
        _check_width(x, mean, "mean")
        return _at(positions, x, mean.to(x.device, x.dtype).expand_as(x))

    return write


def replace(value: torch.Tensor, positions: Positions = None) -> Writer:
    """Replace the activation with a given tensor, broadcast to its shape (e.g. activation patching)."""
    value = torch.as_tensor(value)

    def write(x: torch.Tensor) -> torch.Tensor:
        try:
            new = value.to(x.device, x.dtype).expand_as(x)
        except RuntimeError as exc:
            raise HookError(
                f"replacement of shape {tuple(value.shape)} does not broadcast to {tuple(x.shape)}"
            ) from exc
        return _at(positions, x, new)

    return write
