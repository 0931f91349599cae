"""A small resumable pipeline: named stages that write into one run directory.

`run_dir/pipeline.json` records the run's config and, per stage, when it finished and its summary. On a
rerun a stage is skipped only if it is recorded as done *and* its `verify` passes on the files it left;
otherwise it runs again, and every later stage is redone too (its inputs changed). The record is written
atomically after each stage, so a kill at any point loses at most the stage in flight, which resumes or
restarts according to its own logic (harvest and training resume from their own checkpoints).
"""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmscope.core.atomic import atomic_write_json
from lmscope.errors import LmscopeError

RECORD = "pipeline.json"


class PipelineError(LmscopeError):
    """A run directory that belongs to another configuration, or a stage whose output fails verification."""


@dataclass(frozen=True)
class Stage:
    name: str
    description: str
    run: Callable[[Path], dict[str, Any]]  # does the work in the run dir; returns a JSON-able summary
    verify: Callable[[Path], None]  # raises (any exception) if the stage's outputs are missing or invalid


@dataclass
class StageOutcome:
    name: str
    skipped: bool
    seconds: float
    summary: dict[str, Any]


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


class Pipeline:
    def __init__(self, run_dir: str | Path, config: dict[str, Any], stages: list[Stage]) -> None:
        self.run_dir = Path(run_dir)
        self.config = config
        self.stages = stages
        names = [s.name for s in stages]
        if len(set(names)) != len(names):
            raise PipelineError(f"duplicate stage names in {names}")

    # ------------------------------------------------------------------ record
    def _record_path(self) -> Path:
        return self.run_dir / RECORD

    def load_record(self) -> dict[str, Any]:
        path = self._record_path()
        if not path.exists():
            return {"config": self.config, "stages": {}}
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise PipelineError(f"{path} is unreadable ({exc}); delete it to start the run over") from exc
        if record.get("config") != self.config:
            old = record.get("config", {})
            diff = sorted(k for k in set(old) | set(self.config) if old.get(k) != self.config.get(k))
            details = ", ".join(f"{k}: {old.get(k)!r} -> {self.config.get(k)!r}" for k in diff)
            raise PipelineError(
                f"{self.run_dir} holds a run with a different configuration ({details}); use another run "
                "directory, or pass --restart to start this one over"
            )
        return record

    def _save(self, record: dict[str, Any]) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self._record_path(), record)

    def status(self) -> dict[str, str]:
        """Each stage's state: 'done' (recorded and verified), 'invalid' (recorded, fails verify) or 'todo'."""
        record = self.load_record()
        out: dict[str, str] = {}
        upstream_ok = True
        for stage in self.stages:
            state = "todo"
            if upstream_ok and record["stages"].get(stage.name, {}).get("done"):
                try:
                    stage.verify(self.run_dir)
                    state = "done"
                except Exception:
                    state = "invalid"
            upstream_ok = state == "done"
            out[stage.name] = state
        return out

    # ------------------------------------------------------------------ run
    def run(
        self,
        on_start: Callable[[Stage, int, int], None] | None = None,
        on_end: Callable[[Stage, StageOutcome], None] | None = None,
    ) -> list[StageOutcome]:
        record = self.load_record()
        states = self.status()
        outcomes: list[StageOutcome] = []
        redo_rest = False
        for i, stage in enumerate(self.stages):
            entry = record["stages"].get(stage.name, {})
            if not redo_rest and states[stage.name] == "done":
                outcome = StageOutcome(stage.name, True, 0.0, entry.get("summary", {}))
            else:
                redo_rest = True  # everything downstream of a (re)run stage is redone
                record["stages"].pop(stage.name, None)
                self._save(record)
                if on_start:
                    on_start(stage, i + 1, len(self.stages))
                start = time.perf_counter()
                summary = stage.run(self.run_dir)
                try:
                    stage.verify(self.run_dir)
                except Exception as exc:
                    raise PipelineError(
                        f"stage {stage.name!r} finished but its output fails verification: {exc}"
                    ) from exc
                seconds = time.perf_counter() - start
                record["stages"][stage.name] = {
                    "done": True,
                    "finished": _now(),
                    "seconds": seconds,
                    "summary": summary,
                }
                self._save(record)
                outcome = StageOutcome(stage.name, False, seconds, summary)
            outcomes.append(outcome)
            if on_end:
                on_end(stage, outcome)
        return outcomes
