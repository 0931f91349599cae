"""The `local` explainer end to end on SmolLM2-135M-Instruct: two features of a planted atlas get labels, and the
local reader scores one of them (slow on a shared CPU, so excluded from `make test`)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from explain_helpers import planted_atlas
from lmscope.explain import LocalBackend, OpsConfig, explain_atlas, score_atlas

pytestmark = [pytest.mark.slow, pytest.mark.smollm2]


def test_local_explainer_labels_two_features(smollm2, tmp_path: Path) -> None:
    atlas = planted_atlas(tmp_path / "planted.db", n_random=1)
    backend = LocalBackend(loaded=smollm2)
    ops = OpsConfig(concurrency=1, retries=0)
    report = explain_atlas(atlas, "local", features=[0, 2], backend=backend, ops=ops)
    assert not report.failed and len(report.done) == 2
    assert report.usage.requests == 2 and report.usage.output_tokens > 0
    conn = sqlite3.connect(atlas)
    rows = conn.execute("SELECT feature, text, source, explainer FROM labels ORDER BY feature").fetchall()
    assert [r[0] for r in rows] == [0, 2]
    assert all(r[1].strip() and r[2] == "machine" and r[3] == "local:smollm2-135m" for r in rows)
    # a rerun is answered from the atlas (skipped), with no generation at all
    again = explain_atlas(atlas, "local", features=[0, 2], backend=backend, ops=ops)
    assert again.skipped == 2 and again.usage.requests == 0
    # the same weak model as a detection reader: it may answer badly, but the pipeline must report, not crash
    scored = score_atlas(atlas, "detection", "local", features=[0], backend=backend, ops=ops)
    assert len(scored.done) + len(scored.failed) == 1
    for d in scored.done:
        assert d["score"] is None or 0.0 <= d["score"] <= 1.0
