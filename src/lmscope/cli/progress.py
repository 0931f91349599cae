"""Rendering the library's progress events as rich progress bars on stderr (the only place bars are drawn)."""

from __future__ import annotations

from types import TracebackType
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
from rich.text import Text

from lmscope.core.progress import ProgressEvent


class _Rate(ProgressColumn):
    """Units per second (tok/s for token tasks)."""

    def render(self, task: Any) -> Text:
        speed = task.finished_speed or task.speed
        unit = "tok" if task.fields.get("unit") == "tokens" else task.fields.get("unit", "")
        return Text(f"{speed:,.0f} {unit}/s" if speed else f"? {unit}/s", style="progress.data.speed")


class RichProgress:
    """A context manager whose instance is a `ProgressCallback`: one bar per task, stats beside it.

        with RichProgress() as bar:
            harvest(model, corpus, out, cfg, progress=bar)
    """

    def __init__(self, enabled: bool = True, console: Console | None = None) -> None:
        self.enabled = enabled
        self._bar = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[unit]}"), _Rate(), TextColumn("{task.fields[stats]}"),
            TextColumn("ETA"), TimeRemainingColumn(),
            console=console or Console(stderr=True), disable=not enabled,
        )  # fmt: skip
        self._tasks: dict[str, Any] = {}

    def __enter__(self) -> RichProgress:
        self._bar.__enter__()
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self._bar.__exit__(et, ev, tb)

    def __call__(self, event: ProgressEvent) -> None:
        for note in event.notes:  # printed above the bars, even when the bars are off
            self._bar.console.print(note, style="yellow", markup=False, highlight=False)
        if not self.enabled:
            return
        task = self._tasks.get(event.task)
        if task is None:
            task = self._bar.add_task(event.task, total=event.total, completed=event.done, unit=event.unit, stats="")
            self._tasks[event.task] = task
        self._bar.update(task, completed=event.done, total=event.total, stats=event.stats)
