"""The trainer reports progress through the callback API (lmscope.core.progress) and draws nothing itself."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from lmscope.core.progress import ProgressEvent
from lmscope.dictionaries import DictConfig
from lmscope.training import RunSpec, TensorSource, TrainConfig, Trainer
from lmscope.training import evaluate as evaluate_module
from lmscope.training import trainer as trainer_module


def test_fit_reports_one_task_per_run_in_steps() -> None:
    x = torch.randn(2048, 16)
    runs = [RunSpec(DictConfig(arch="topk", d_in=16, d_sae=32, k=k)) for k in (2, 4)]
    events: list[ProgressEvent] = []
    tc = TrainConfig(total_tokens=6 * 256, warmup_steps=1, log_every=4)
    Trainer(runs, tc).fit(TensorSource(x, batch_size=256), progress=events.append)
    by_task: dict[str, list[ProgressEvent]] = {}
    for e in events:
        by_task.setdefault(e.task, []).append(e)
    assert set(by_task) == {"topk-m32-k2", "topk-m32-k4"}
    for task_events in by_task.values():
        assert all(e.unit == "steps" for e in task_events)
        assert task_events[0].done == 0 and not task_events[0].finished  # the start
        assert [e.finished for e in task_events].count(True) == 1 and task_events[-1].finished
        assert task_events[-1].done == task_events[-1].total == 6
        assert [e.done for e in task_events[1:-1]] == list(range(1, 7))
        logged = [e for e in task_events if e.stats]
        assert logged[0].done == 4  # the first log line
        assert re.fullmatch(r"L0 \d+\.\d  FVU \d\.\d{3}  dead \d+\.\d%  [\d,]+ tok/s", logged[0].stats)
        assert {"fvu", "l0", "dead_frac", "tok_s", "step", "run"} <= set(task_events[-1].info)
        assert task_events[-1].info["step"] == 6 and task_events[-1].info["run"] == task_events[-1].task


def test_no_bar_from_the_library_and_the_old_switches_warn() -> None:
    for module in (trainer_module, evaluate_module):
        source = Path(module.__file__ or "").read_text()
        assert "import rich" not in source and "from rich" not in source, module.__name__
    with pytest.warns(DeprecationWarning, match="progress_bar is deprecated"):
        TrainConfig(total_tokens=256, progress_bar=True)
    assert TrainConfig(total_tokens=256, progress_bar=False).progress_bar is False  # saved configs still load
    x = torch.randn(512, 8)
    with pytest.warns(DeprecationWarning, match="no longer draws a bar"):
        Trainer([DictConfig(arch="relu", d_in=8, d_sae=16)], TrainConfig(total_tokens=256, warmup_steps=1)).fit(
            TensorSource(x, batch_size=128), progress=True
        )
