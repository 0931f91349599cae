"""dictionaries/select.py: its top-k (the C kernel, and the torch blocks) returns torch.topk's values (as a set),
indices pointing at them."""

from __future__ import annotations

import math

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import HealthCheck, given, settings

from lmscope.dictionaries.select import MIN_BLOCKS_PER_K, MIN_WIDTH, block_plan, block_size, top_k


@pytest.fixture(autouse=True, params=["native", "torch"])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test runs on both paths: the C kernel of core/native.py (where it is built) and the torch blocks."""
    monkeypatch.setenv("LMSCOPE_NATIVE", "1" if request.param == "native" else "0")
    return str(request.param)


def check_same_set(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    vals, idx = top_k(x, k)
    ref = x.topk(k, dim=-1).values
    assert vals.shape == idx.shape == ref.shape
    assert torch.equal(vals.sort(-1).values, ref.sort(-1).values)  # the same values
    assert torch.equal(x.gather(-1, idx), vals)  # the indices point at them
    assert bool((idx.sort(-1).values.diff(dim=-1) > 0).all())  # no element twice
    return vals, idx


@pytest.mark.parametrize("width,k", [(4608, 32), (16384, 64), (1024, 8), (3000, 16), (24576, 32)])
def test_real_widths_take_the_blocked_path_and_match_topk(width: int, k: int) -> None:
    bs = block_size(width, k)
    assert bs is not None and width % bs == 0 and width // bs >= MIN_BLOCKS_PER_K * k
    plan = block_plan(width, k)
    assert plan and width % math.prod(plan) == 0 and width // math.prod(plan) >= MIN_BLOCKS_PER_K * k
    check_same_set(torch.randn(64, width, generator=torch.Generator().manual_seed(width)), k)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    rows=st.integers(1, 9),
    width=st.sampled_from([MIN_WIDTH, 1152, 2048, 4608, 1030]),
    k=st.integers(1, 48),
    levels=st.sampled_from([None, 2, 5]),  # None: continuous values; else few distinct values, so many ties
    seed=st.integers(0, 2**16),
)
def test_property_same_values_as_torch_topk(rows: int, width: int, k: int, levels: int | None, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, width, generator=g)
    if levels is not None:
        x = torch.randint(0, levels, (rows, width), generator=g).float()
    check_same_set(x, k)


def test_adversarial_rows_all_top_values_in_one_block() -> None:
    """The k largest sit in one block (every nb-th element), where the block maxima alone would miss them."""
    width, k = 4608, 32
    bs = block_plan(width, k)[0]
    nb = width // bs
    x = torch.randn(3, width) - 10
    x[:, torch.arange(bs) * nb + 5] = torch.arange(bs, dtype=torch.float32) + 100  # block 5 holds the bs largest
    x[1, 7] = 50.0
    check_same_set(x, k)


def test_adversarial_rows_all_top_blocks_in_one_outer_block() -> None:
    """Three passes: the k largest block maxima sit in one block of block maxima (one level up), and the top values
    in few blocks, so a selection that took the outer level's maxima alone would miss them."""
    width, k = 4608, 32
    plan = block_plan(width, k)
    assert len(plan) == 2, plan  # the three-pass plan at this shape
    b1, b2 = plan
    nb1, nb2 = width // b1, width // (b1 * b2)
    x = torch.randn(4, width) - 10
    # block maxima m[j] = max over r of x[r * nb1 + j]; outer block J holds the maxima j = J, J + nb2, ...
    inner = torch.arange(b2) * nb2 + 3  # the block-maximum positions of outer block 3
    for r in range(b1):
        x[:, r * nb1 + inner] = 100 + r * b2 + torch.arange(b2, dtype=torch.float32)  # b1 * b2 largest, in outer 3
    x[2, 11] = 99.5  # and one more elsewhere
    check_same_set(x, k)
    check_same_set(x, b1 * b2)


def test_leading_dims_infinities_and_nan_follow_torch() -> None:
    x = torch.randn(2, 3, 2048)
    x[0, 0, :100] = float("-inf")
    x[1, 2, 17] = float("inf")
    check_same_set(x, 16)
    y = torch.randn(2, 2048)
    y[0, 3] = float("nan")  # NaN is the largest, as in torch.topk
    vals, idx = top_k(y, 8)
    assert int(idx[0].eq(3).sum()) == 1 and bool(vals[0].isnan().any())
    assert torch.equal(vals[1].sort().values, y[1].topk(8).values.sort().values)


def test_gradient_reaches_the_selected_elements_as_through_torch_topk() -> None:
    x = torch.randn(5, 4608, requires_grad=True)
    w = torch.randn(5, 4608)
    vals, idx = top_k(x, 32)
    (vals * w.gather(1, idx)).sum().backward()
    ref = torch.zeros(5, 4608).scatter_(1, x.detach().topk(32, dim=1).indices, 1.0) * w
    assert x.grad is not None and torch.allclose(x.grad, ref)


def test_short_rows_non_float_and_non_contiguous_fall_back_or_still_match() -> None:
    assert block_size(512, 4) is None  # shorter than MIN_WIDTH: torch.topk
    assert block_size(2048, 300) is None  # too few blocks per k
    assert block_size(1031, 4) is None  # a prime width has no block size
    check_same_set(torch.randn(4, 512), 4)
    xi = torch.randint(0, 1000, (3, 2048))
    vi, _ii = top_k(xi, 10)
    assert torch.equal(vi.sort(-1).values, xi.topk(10).values.sort(-1).values)
    check_same_set(torch.randn(4608, 6).T, 32)  # a transposed (non-contiguous) view
    vals, _idx = top_k(torch.randn(0, 4608), 32)
    assert vals.shape == (0, 32)
