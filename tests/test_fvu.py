"""The one FVU definition: the batch figure, the streaming accumulator, and their agreement."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lmscope.dictionaries import FVUAccumulator, fvu
from lmscope.dictionaries import base as dictionaries_base
from lmscope.dictionaries.metrics import EPS


def reference(target: torch.Tensor, recon: torch.Tensor) -> float:
    t, r = target.double().reshape(-1, target.shape[-1]), recon.double().reshape(-1, recon.shape[-1])
    return float((t - r).pow(2).sum() / (t - t.mean(0)).pow(2).sum())


def stream(target: torch.Tensor, recon: torch.Tensor, sizes: list[int]) -> FVUAccumulator:
    acc = FVUAccumulator()
    start = 0
    for size in sizes:
        acc.update(target[start : start + size], recon[start : start + size])
        start += size
    acc.update(target[start:], recon[start:])
    return acc


def test_batch_fvu_is_the_definition_and_stays_importable() -> None:
    g = torch.Generator().manual_seed(0)
    y = torch.randn(3, 50, 8, generator=g) * 2 + 1
    recon = y + 0.3 * torch.randn(3, 50, 8, generator=g)
    assert float(fvu(y, recon)) == pytest.approx(reference(y, recon), rel=1e-12)
    assert dictionaries_base.fvu is fvu
    assert float(fvu(y, y)) == 0.0
    assert float(fvu(y, y.mean((0, 1)).expand_as(y))) == pytest.approx(1.0)  # predicting the mean explains nothing


def test_streaming_equals_batch_on_the_concatenation() -> None:
    g = torch.Generator().manual_seed(1)
    y = torch.randn(1000, 16, generator=g) * 3 + 5
    recon = y + torch.randn(1000, 16, generator=g)
    whole = float(fvu(y, recon))
    for sizes in ([1000], [1, 999], [128] * 7, [3, 0, 500, 1]):
        acc = stream(y, recon, sizes)
        assert acc.n == 1000
        assert acc.value() == pytest.approx(whole, rel=1e-12)
        assert acc.sse == pytest.approx(float((y.double() - recon.double()).pow(2).sum()), rel=1e-12)


def test_a_large_offset_does_not_cancel_the_variance() -> None:
    """sum(y^2) - n mean^2 loses every digit here; the pairwise update about the mean does not."""
    g = torch.Generator().manual_seed(2)
    y = torch.randn(4096, 4, generator=g, dtype=torch.float64) + 1e8  # (the naive formula gives -0.125)
    recon = y + 0.5
    acc = stream(y, recon, [256] * 15)
    assert acc.value() == pytest.approx(reference(y, recon), rel=1e-6)
    assert acc.value() == pytest.approx(float(fvu(y, recon)), rel=1e-6)


def test_degenerate_inputs() -> None:
    assert FVUAccumulator().value() != FVUAccumulator().value()  # NaN before any token
    y = torch.ones(10, 3)
    assert FVUAccumulator().update(y, y + 1).value() == pytest.approx(30 / EPS)  # constant target: floored variance
    with pytest.raises(ValueError, match="differ in shape"):
        fvu(torch.zeros(4, 3), torch.zeros(4, 2))
    acc = FVUAccumulator().update(torch.zeros(4, 3), torch.zeros(4, 3))
    with pytest.raises(ValueError, match="batch width"):
        acc.update(torch.zeros(4, 2), torch.zeros(4, 2))


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(2, 60),
    width=st.integers(1, 6),
    cuts=st.lists(st.integers(0, 60), max_size=5),
    offset=st.floats(-1e3, 1e3),
    scale=st.floats(1e-2, 1e2),
    seed=st.integers(0, 2**16),
)
def test_streaming_equals_batch_property(
    rows: int, width: int, cuts: list[int], offset: float, scale: float, seed: int
) -> None:
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(rows, width, generator=g, dtype=torch.float64) * scale + offset
    recon = y + torch.randn(rows, width, generator=g, dtype=torch.float64) * scale
    sizes = sorted(min(c, rows) for c in cuts)
    sizes = [b - a for a, b in zip([0, *sizes], sizes, strict=False)]
    acc = stream(y, recon, sizes)
    assert acc.n == rows
    assert acc.value() == pytest.approx(float(fvu(y, recon)), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("native_on", ["1", "0"], ids=["c kernel", "torch"])
def test_fvu_from_the_losss_squared_error_equals_fvu(monkeypatch: pytest.MonkeyPatch, native_on: str) -> None:
    """The trainer's per-step figure: the loss's squared error over the batch spread, without float64 copies
    (through core/native.py's C loop where it is built, torch's ops otherwise)."""
    from lmscope.dictionaries.metrics import fvu_from_sse

    monkeypatch.setenv("LMSCOPE_NATIVE", native_on)
    g = torch.Generator().manual_seed(3)
    for offset in (0.0, 1e3, 1e5):  # a large offset must not cancel the spread away here either
        y = torch.randn(2048, 24, generator=g) * 2 + offset
        recon = y + 0.3 * torch.randn(2048, 24, generator=g)
        sse = (recon - y).pow(2).sum(-1).mean() * y.shape[0]  # how the trainer gets it: the MSE term x tokens
        assert float(fvu_from_sse(sse, y)) == pytest.approx(float(fvu(y, recon)), rel=1e-5)
        assert float(fvu_from_sse(sse, y)) == pytest.approx(reference(y, recon), rel=1e-5)
