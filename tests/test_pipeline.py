"""The resumable stage runner behind `lmscope demo`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmscope.workflows.pipeline import Pipeline, PipelineError, Stage


def make_stages(calls: list[str], fail_at: str | None = None) -> list[Stage]:
    def stage(name: str) -> Stage:
        def run(d: Path) -> dict:
            calls.append(name)
            if name == fail_at:
                raise KeyboardInterrupt  # a kill mid-stage
            (d / f"{name}.out").write_text(name)
            return {"wrote": f"{name}.out"}

        def verify(d: Path) -> None:
            if (d / f"{name}.out").read_text() != name:
                raise ValueError(f"{name}.out is corrupt")

        return Stage(name, f"stage {name}", run, verify)

    return [stage(n) for n in ("a", "b", "c")]


def test_rerun_skips_verified_stages(tmp_path):
    calls: list[str] = []
    out = Pipeline(tmp_path, {"k": 1}, make_stages(calls)).run()
    assert calls == ["a", "b", "c"] and not any(o.skipped for o in out)
    out = Pipeline(tmp_path, {"k": 1}, make_stages(calls)).run()
    assert calls == ["a", "b", "c"] and all(o.skipped for o in out)
    assert out[1].summary == {"wrote": "b.out"}


def test_kill_mid_stage_then_resume_does_not_redo_finished_stages(tmp_path):
    calls: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        Pipeline(tmp_path, {"k": 1}, make_stages(calls, fail_at="b")).run()
    assert calls == ["a", "b"]
    record = json.loads((tmp_path / "pipeline.json").read_text())
    assert set(record["stages"]) == {"a"}
    Pipeline(tmp_path, {"k": 1}, make_stages(calls)).run()
    assert calls == ["a", "b", "b", "c"]


def test_corrupt_output_reruns_that_stage_and_everything_after(tmp_path):
    calls: list[str] = []
    Pipeline(tmp_path, {"k": 1}, make_stages(calls)).run()
    (tmp_path / "b.out").write_text("garbage")
    p = Pipeline(tmp_path, {"k": 1}, make_stages(calls))
    assert p.status() == {"a": "done", "b": "invalid", "c": "todo"}
    p.run()
    assert calls == ["a", "b", "c", "b", "c"]


def test_a_run_dir_of_another_config_is_refused(tmp_path):
    Pipeline(tmp_path, {"layer": 6, "tokens": 100}, make_stages([])).run()
    with pytest.raises(PipelineError, match=r"different configuration \(layer: 6 -> 7\)"):
        Pipeline(tmp_path, {"layer": 7, "tokens": 100}, make_stages([])).run()


def test_a_stage_whose_output_fails_verification_is_an_error(tmp_path):
    stages = [Stage("x", "broken", lambda d: {}, lambda d: (_ for _ in ()).throw(ValueError("no output")))]
    with pytest.raises(PipelineError, match="stage 'x' finished but its output fails verification: no output"):
        Pipeline(tmp_path, {}, stages).run()
