"""Run an iterator ahead of its consumer in a background thread, so reading and preparing the next items overlaps
the work done on the current one (the harvest tokenises the next contexts while the model runs on these, say).

It pays where the consumer waits on something other than the CPU (a disk, a GPU) or leaves cores idle. Beside
multi-threaded CPU kernels it does not: the thread takes a core from their team, and they stall until it gives it
back (the activation store's batches are read in the trainer's own thread for that reason; docs/harvest.md).

The items arrive in the iterator's own order, so a seeded pipeline yields exactly what it yields unthreaded. An
exception raised by the iterator is raised in the consumer at the point where the failing item would have been.
Closing the returned generator (or dropping it) stops the thread after at most one more item. Work that releases
the GIL (file reads, hashing, torch kernels) runs truly in parallel with the consumer; pure Python does not.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")

_DONE = object()


class _Failure:
    def __init__(self, error: BaseException) -> None:
        self.error = error


def prefetch(items: Iterable[T], depth: int = 2, name: str = "lmscope-prefetch") -> Iterator[T]:
    """Yield the items of `items`, produced up to `depth` ahead by a daemon thread named `name` (depth >= 1)."""
    if depth < 1:
        raise ValueError(f"prefetch depth must be at least 1, got {depth}")
    ready: queue.Queue[object] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(obj: object) -> bool:
        while not stop.is_set():
            try:
                ready.put(obj, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        it = iter(items)
        try:
            for item in it:
                if not put(item):
                    break
            else:
                put(_DONE)
        except BaseException as e:  # handed to the consumer, raised there
            put(_Failure(e))
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=produce, name=name, daemon=True)
    thread.start()
    try:
        while True:
            obj = ready.get()
            if obj is _DONE:
                return
            if isinstance(obj, _Failure):
                raise obj.error
            yield obj  # type: ignore[misc]
    finally:
        stop.set()
        thread.join()
