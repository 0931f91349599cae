"""Training metrics (FVU, L0, dead fraction...) and the JSONL metrics log (plus wandb when asked)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lmscope.errors import LmscopeError


class MetricsLog:
    """Appends one JSON object per line; optionally mirrors to wandb (only if installed and asked for)."""

    def __init__(self, path: Path | None, wandb_project: str | None = None, config: dict[str, Any] | None = None):
        self.path = path
        self._wandb: Any = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        if wandb_project:
            try:
                import wandb
            except ImportError as exc:
                raise LmscopeError(
                    "wandb logging was asked for but wandb is not installed; `pip install wandb` or drop --wandb"
                ) from exc
            self._wandb = wandb.init(project=wandb_project, config=config or {})

    def truncate_after(self, step: int) -> None:
        """Drop records past `step` (logged after the checkpoint a resumed run restarts from)."""
        if self.path is None or not self.path.exists():
            return
        keep = [r for r in read_log(self.path) if r.get("step", 0) <= step]
        from lmscope.core.atomic import atomic_write_bytes

        atomic_write_bytes(self.path, "".join(json.dumps(r) + "\n" for r in keep).encode())

    def log(self, record: dict[str, Any]) -> None:
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        if self._wandb is not None:
            self._wandb.log(record, step=record.get("step"))

    def close(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()


class Meter:
    """Averages scalars over the steps between two log lines."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.n = 0

    def add(self, values: dict[str, float]) -> None:
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)
        self.n += 1

    def mean(self) -> dict[str, float]:
        return {k: v / max(1, self.n) for k, v in self.sums.items()}

    def reset(self) -> None:
        self.sums.clear()
        self.n = 0


def read_log(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
