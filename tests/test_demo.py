"""`lmscope demo --quick --no-serve` end to end on SmolLM2, killed mid-run and resumed (issue 8)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmscope.atlas.schema import open_atlas
from lmscope.workflows.demo import Demo, DemoConfig

pytestmark = pytest.mark.smollm2


def _record(run: Path) -> dict:
    try:
        return json.loads((run / "pipeline.json").read_text())["stages"]
    except (OSError, ValueError, KeyError):
        return {}


def test_quick_demo_killed_mid_stage_resumes_without_redoing_finished_stages(smollm2, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "lmscope.cli.app", "demo", "--quick", "--no-serve", "--run-dir", str(run),
           "--device", "cpu"]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 600
    try:
        while "harvest" not in _record(run):  # wait until the first stage is recorded, then kill -9 mid-train
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:] if proc.stdout else ""
            assert time.monotonic() < deadline, "harvest did not finish in 10 minutes"
            time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    harvested = _record(run)["harvest"]["finished"]
    assert "atlas" not in _record(run)

    resumed = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "✓ harvest (verified, skipped)" in resumed.stdout
    stages = _record(run)
    assert stages["harvest"]["finished"] == harvested  # not redone
    assert set(stages) == {"harvest", "train", "eval", "atlas", "explain", "transcoders", "circuit", "audit"}
    assert "most clearly labelled features" in resumed.stdout and "lmscope steer smollm2-135m" in resumed.stdout
    assert "--batch --measure" in " ".join(resumed.stdout.split())  # the steering search's reproducible command
    assert "Attribution graph of 'The capital of France is'" in " ".join(resumed.stdout.split())
    assert "audit (open /audits/demo in the explorer)" in resumed.stdout
    audit = json.loads((run / "audits" / "demo" / "report.json").read_text())
    assert set(audit["concepts"]) == {"sentiment"} and audit["steering"] and audit["features"]["concepts"]["sentiment"]
    assert audit["backdoor"]["mode"] == "alone" and audit["summary"]
    graph = json.loads((run / "graphs" / "demo-circuit.json").read_text())
    assert graph["nodes"] and graph["links"] and graph["metadata"]["lmscope"]["scores"]["unpruned"]["completeness"] > 0

    # A valid atlas with labelled, scored features.
    conn = open_atlas(run / "atlas.db")
    live = conn.execute("SELECT count(*) FROM features WHERE dead = 0").fetchone()[0]
    labelled = conn.execute(
        "SELECT count(DISTINCT feature) FROM labels WHERE source = 'machine' AND score IS NOT NULL"
    ).fetchone()[0]
    conn.close()
    assert live > 0 and labelled >= min(live, DemoConfig.quick().explain_limit or live)

    # A rerun verifies every stage and redoes none.
    job = Demo(DemoConfig.quick(), run, device="cpu")
    job._model = smollm2
    assert job.pipeline().status() == dict.fromkeys(stages, "done")
    eval_json = json.loads((run / "eval.json").read_text())
    assert eval_json["skip_tokens"] == DemoConfig.quick().harvest_tokens  # evaluated on held-out text
