"""core/prefetch.py: items in order, errors where they happened, the thread stopped on close."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from lmscope.core.prefetch import prefetch


def _threads() -> int:
    return sum(t.name == "lmscope-prefetch" for t in threading.enumerate())


def test_items_arrive_in_order_and_all_of_them() -> None:
    assert list(prefetch(iter(range(1000)), depth=3)) == list(range(1000))
    assert list(prefetch([], depth=1)) == []


def test_a_seeded_torch_pipeline_yields_the_same_tensors_threaded() -> None:
    def batches():
        g = torch.Generator().manual_seed(7)
        for _ in range(20):
            yield torch.randn(64, 8, generator=g)

    for a, b in zip(batches(), prefetch(batches()), strict=True):
        assert torch.equal(a, b)


def test_the_producer_runs_ahead_of_the_consumer_by_at_most_depth() -> None:
    made: list[int] = []

    def items():
        for i in range(100):
            made.append(i)
            yield i

    it = prefetch(items(), depth=2)
    assert next(it) == 0
    time.sleep(0.3)
    # item 0 consumed, up to 2 queued, and one more made and waiting to be put
    assert 3 <= len(made) <= 4
    it.close()


def test_an_error_is_raised_in_the_consumer_after_the_items_before_it() -> None:
    def items():
        yield 1
        yield 2
        raise OSError("shard 3 is unreadable")

    got = []
    with pytest.raises(OSError, match="shard 3 is unreadable"):
        for x in prefetch(items()):
            got.append(x)
    assert got == [1, 2]


def test_closing_early_stops_the_thread_and_closes_the_source() -> None:
    closed = threading.Event()

    def items():
        try:
            i = 0
            while True:
                yield i
                i += 1
        finally:
            closed.set()

    before = _threads()
    it = prefetch(items(), depth=2)
    assert [next(it) for _ in range(5)] == [0, 1, 2, 3, 4]
    it.close()
    assert closed.wait(5)
    assert _threads() == before


def test_a_depth_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        next(prefetch(range(3), depth=0))
