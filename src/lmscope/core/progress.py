"""Progress reporting through callbacks: the library reports, only the CLI renders (lmscope.cli.progress).

A long job takes `progress: ProgressCallback | None`. It calls it with a `ProgressEvent` when a task starts
(`done` 0 or, after a resume, what was already done), as work advances, and once with `finished=True`. `None`
means silence. Events are cheap: a job may report every batch, and a renderer throttles.

    def show(e: ProgressEvent) -> None:
        print(f"{e.task}: {e.done}/{e.total} {e.unit} {e.stats}")

    harvest(model, "stdlib", "acts/", cfg, progress=show)
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ProgressEvent:
    """Where one task of a job stands."""

    task: str  # what is running: "harvest", "atlas", a dictionary's run name, ...
    done: int  # units completed so far (absolute, not an increment)
    total: int | None = None  # units in all, when known
    unit: str = "tokens"  # "tokens", "steps", "features", ...
    stats: str = ""  # a short human-readable line of current figures ("L0 32.0  FVU 0.210 ...")
    finished: bool = False  # the last event of this task
    info: dict[str, Any] = field(default_factory=dict)  # the same figures, machine-readable
    notes: tuple[str, ...] = ()  # lines to show once (e.g. a training run's new health warnings), not a status


ProgressCallback = Callable[[ProgressEvent], None]


def resolve(progress: ProgressCallback | bool | None) -> ProgressCallback | None:
    """A callback, or None for silence. `True`/`False` (lmscope 0.1's show-a-bar flag) are accepted for one release:
    the library no longer draws bars itself, so `True` warns and is silent; pass a callback (the CLI does)."""
    if progress is None or progress is False:
        return None
    if progress is True:
        warnings.warn(
            "progress=True no longer draws a bar from the library; pass a callback such as "
            "lmscope.cli.progress.RichProgress() (the CLI does), or None",
            DeprecationWarning,
            stacklevel=3,
        )
        return None
    if not callable(progress):
        raise TypeError(f"progress must be a callable taking a ProgressEvent, or None; got {type(progress).__name__}")
    return progress


def emit(progress: ProgressCallback | None, event: ProgressEvent) -> None:
    """Call the callback if there is one."""
    if progress is not None:
        progress(event)
