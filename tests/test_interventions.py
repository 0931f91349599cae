"""Properties of the intervention primitives, checked with hypothesis on random activations."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lmscope import HookError
from lmscope.model import interventions as iv

seeds = st.integers(0, 2**16)
values = st.floats(-50, 50, allow_nan=False)


def acts(seed: int, shape: tuple[int, ...] = (2, 5, 16)) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@settings(max_examples=50, deadline=None)
@given(seeds, values)
def test_clamp_sets_the_coefficient_and_keeps_the_orthogonal_part(seed, value):
    x = acts(seed)
    d = acts(seed + 1, (16,))
    y = iv.clamp_direction(d, value)(x)
    u = d / d.norm()
    torch.testing.assert_close(y @ u, torch.full(x.shape[:-1], value, dtype=x.dtype))
    orth = lambda t: t - (t @ u).unsqueeze(-1) * u  # noqa: E731
    torch.testing.assert_close(orth(y), orth(x))


@settings(max_examples=30, deadline=None)
@given(seeds, values)
def test_add_and_scale(seed, s):
    x = acts(seed)
    v = acts(seed + 1, (16,))
    torch.testing.assert_close(iv.add(v, scale=s)(x), x + s * v)
    torch.testing.assert_close(iv.scale(s)(x), x * s)


@settings(max_examples=30, deadline=None)
@given(seeds, st.integers(0, 4))
def test_positions_limit_the_edit(seed, pos):
    x = acts(seed)
    y = iv.zero_ablate(positions=[pos])(x)
    assert torch.all(y[:, pos] == 0)
    keep = [i for i in range(5) if i != pos]
    assert torch.equal(y[:, keep], x[:, keep])
    assert not torch.all(x[:, pos] == 0)  # the input is not modified in place


def test_mean_ablate_and_replace():
    x = acts(0)
    mean = torch.arange(16, dtype=torch.float64)
    assert torch.equal(iv.mean_ablate(mean)(x), mean.expand_as(x))
    patch = acts(3)
    assert torch.equal(iv.replace(patch)(x), patch)
    y = iv.replace(patch, positions=slice(0, 2))(x)
    assert torch.equal(y[:, :2], patch[:, :2]) and torch.equal(y[:, 2:], x[:, 2:])


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: iv.add(torch.tensor([1.0, float("nan")])), "NaN or infinite"),
        (lambda: iv.scale(float("inf")), "finite"),
        (lambda: iv.clamp_direction(torch.zeros(4), 1.0), "zero vector"),
        (lambda: iv.add(torch.zeros(2, 2)), "1-D vector"),
    ],
)
def test_bad_arguments_are_refused_up_front(make, match):
    with pytest.raises(HookError, match=match):
        make()


def test_width_mismatch_is_clear():
    with pytest.raises(HookError, match="width 8 but the hooked activation has width 16"):
        iv.add(torch.zeros(8))(acts(0))
    with pytest.raises(HookError, match="does not broadcast"):
        iv.replace(torch.zeros(3, 7))(acts(0))
