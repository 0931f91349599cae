"""`lmscope explain / score / label` end to end on a planted atlas, with the stats explainer and with an
OpenAI-compatible endpoint served by a local HTTP server; plus the web route for human labels."""

from __future__ import annotations

import json
import re
import sqlite3
from pathlib import Path

import pytest
from typer.testing import CliRunner

from explain_helpers import Reply, ScriptedServer, anthropic_reply, openai_reply, planted_atlas
from lmscope.atlas.store import AtlasStore, FeatureQuery
from lmscope.cli.app import app

runner = CliRunner()


@pytest.fixture
def atlas(tmp_path: Path) -> Path:
    return planted_atlas(tmp_path / "planted.db", n_random=1)


def rows(atlas: Path) -> list[dict]:
    conn = sqlite3.connect(atlas)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute("SELECT * FROM labels ORDER BY feature, id")]
    finally:
        conn.close()


def invoke(*args: str) -> object:
    return runner.invoke(app, [str(a) for a in args])


def test_stats_explain_writes_scored_labels_and_resumes(atlas: Path) -> None:
    r = invoke("explain", atlas)
    assert r.exit_code == 0, r.output
    labels = {x["feature"]: x for x in rows(atlas)}
    assert set(labels) == {0, 1, 2, 4}  # live features only (3 is dead)
    assert labels[0]["text"] == "digits" and labels[0]["explainer"] == "stats" and labels[0]["source"] == "machine"
    assert labels[0]["scorer"] == "rule-detection" and labels[0]["score"] > 0.8
    r = invoke("explain", atlas)
    assert r.exit_code == 0 and "0 features labelled, 4 skipped" in r.output
    r = invoke("explain", atlas, "--features", "0,2", "--redo")
    assert r.exit_code == 0 and "2 features labelled" in r.output
    assert len(rows(atlas)) == 4  # replaced, not duplicated
    # the explorer sees them, and finds them by label
    store = AtlasStore(atlas)
    assert store.labels([0])[0]["text"] == "digits"
    assert [i["id"] for i in store.list_features(FeatureQuery(q="digits", by="label"))["items"]] == [0]


def test_human_labels_are_kept_apart_and_never_overwritten(atlas: Path) -> None:
    assert invoke("explain", atlas, "--features", "0").exit_code == 0
    r = invoke("label", atlas, 0, "numerals in running text", "--author", "ana")
    assert r.exit_code == 0 and "numerals in running text" in r.output and "digits" in r.output
    assert invoke("explain", atlas, "--features", "0", "--redo").exit_code == 0
    by_source = {x["source"]: x for x in rows(atlas)}
    assert by_source["human"]["text"] == "numerals in running text" and by_source["machine"]["text"] == "digits"
    assert AtlasStore(atlas).labels([0])[0] == {"text": "numerals in running text", "source": "human", "score": None,
                                                "explainer": "ana", "scorer": None}  # fmt: skip
    assert invoke("label", atlas, 0, "digits").exit_code == 0  # a correction replaces the human label
    assert [x["text"] for x in rows(atlas) if x["source"] == "human"] == ["digits"]
    assert invoke("label", atlas, 0, "--remove").exit_code == 0
    assert [x["source"] for x in rows(atlas)] == ["machine"]
    r = invoke("label", atlas, 99, "nope")
    assert r.exit_code == 2 and "not in this atlas" in r.output


def test_offline_score_command_scores_human_labels_too(atlas: Path, tmp_path: Path) -> None:
    invoke("label", atlas, 0, "digits")
    invoke("label", atlas, 2, "legal vibes")
    out = tmp_path / "report.json"
    r = invoke("score", atlas, "--scorer", "fuzzing", "--json", out)
    assert r.exit_code == 0, r.output
    rep = {d["feature"]: d for d in json.loads(out.read_text())["done"]}
    assert rep[0]["score"] == 1.0 and rep[0]["scorer"] == "rule-fuzzing"
    assert rep[2]["score"] is None and "states no rule" in rep[2]["note"]
    # a rerun skips the scored label; the label that states no rule is tried again (and stays unscored)
    assert "1 labels scored, 1 skipped" in invoke("score", atlas, "--scorer", "fuzzing").output


def scores(atlas: Path) -> dict[tuple[int, str], float]:
    conn = sqlite3.connect(atlas)
    try:
        sql = "SELECT l.feature, s.scorer, s.score FROM scores s JOIN labels l ON l.id = s.label_id"
        return {(f, sc): v for f, sc, v in conn.execute(sql)}
    finally:
        conn.close()


def test_several_scorers_keep_a_score_each(atlas: Path) -> None:
    """Schema v2: `score --scorer X` writes or replaces the (label, X) row of `scores`; `labels.score` is the
    latest; the explorer's feature data lists every scorer."""
    assert invoke("explain", atlas, "--features", "0").exit_code == 0  # stats labels come scored (rule-detection)
    assert scores(atlas) == {(0, "rule-detection"): rows(atlas)[0]["score"]}
    assert invoke("score", atlas, "--scorer", "fuzzing", "--features", "0").exit_code == 0
    got = scores(atlas)
    assert set(got) == {(0, "rule-detection"), (0, "rule-fuzzing")}
    lab = rows(atlas)[0]
    assert lab["scorer"] == "rule-fuzzing" and lab["score"] == got[(0, "rule-fuzzing")]  # the latest, as in v1
    r = invoke("score", atlas, "--scorer", "fuzzing", "--features", "0", "--redo")
    assert r.exit_code == 0, r.output
    assert len(scores(atlas)) == 2  # replaced, not duplicated
    feat = AtlasStore(atlas).feature(0)
    assert {s["scorer"] for s in feat["labels"][0]["scores"]} == {"rule-detection", "rule-fuzzing"}
    # re-explaining replaces the label, and its scores go with it
    assert invoke("explain", atlas, "--features", "0", "--redo").exit_code == 0
    assert set(scores(atlas)) == {(0, "rule-detection")}


def _answer(path: str, body: dict) -> Reply:
    """An OpenAI-compatible server that labels everything 'digits' and answers scoring prompts sensibly."""
    system = body["messages"][0]["content"]
    user = body["messages"][-1]["content"]
    if "meticulous" in system:
        return Reply(200, openai_reply("The marked tokens are numerals.\nLabel: digits", 200, 12))
    if "JSON list" in system:
        texts = re.findall(r"^Text \d+: (.*)$", user, re.M)
        if "<<" in user:  # fuzzing: correct if the marked tokens are digits
            ans = [int(all(re.sub(r"\s", "", m).isdigit() for m in re.findall(r"<<(.*?)>>", t))) for t in texts]
        else:
            ans = [int(bool(re.search(r"\d", t))) for t in texts]
        return Reply(200, openai_reply(json.dumps(ans), 150, 10))
    n = len(re.findall(r"^\d+\t", user, re.M))
    return Reply(200, openai_reply("\n".join(f"{i}\t0" for i in range(n)), 100, 20))


def test_openai_compatible_explain_and_score_over_http(atlas: Path, tmp_path: Path) -> None:
    with ScriptedServer(responder=_answer) as srv:
        url = f"{srv.url}/v1"
        r = invoke("explain", atlas, "--explainer", "openai", "--base-url", url, "--model", "test-model",
                   "--features", "0,1", "--concurrency", "2")  # fmt: skip
        assert r.exit_code == 0, r.output
        assert "usage: 2 requests" in r.output and "tokens in 400, out 24" in r.output
        got = {x["feature"]: x for x in rows(atlas)}
        assert got[0]["text"] == "digits" and got[0]["explainer"] == "openai:test-model" and got[0]["score"] is None
        n = len(srv.posts)
        r = invoke("explain", atlas, "--explainer", "openai", "--base-url", url, "--model", "test-model",
                   "--features", "0,1")  # fmt: skip
        assert "2 skipped" in r.output and len(srv.posts) == n  # resumed: no new requests
        r = invoke("score", atlas, "--scorer", "detection", "--backend", "openai", "--base-url", url, "--model",
                   "test-model", "--features", "0")  # fmt: skip
        assert r.exit_code == 0, r.output
        lab = next(x for x in rows(atlas) if x["feature"] == 0)
        assert lab["scorer"] == "detection:openai:test-model" and lab["score"] >= 0.8
        r = invoke("score", atlas, "--scorer", "fuzzing", "--backend", "openai", "--base-url", url, "--model",
                   "test-model", "--features", "0", "--redo")  # fmt: skip
        assert r.exit_code == 0 and next(x for x in rows(atlas) if x["feature"] == 0)["score"] > 0.9
    assert (tmp_path / "planted.db.llm-cache.json").is_file()


def test_one_malformed_reply_fails_that_feature_only(atlas: Path) -> None:
    def answer(path: str, body: dict) -> Reply:
        if "<< court>>" in body["messages"][-1]["content"]:  # feature 2's examples
            return Reply(200, "garbage, not JSON")
        return Reply(200, openai_reply("Label: something"))

    with ScriptedServer(responder=answer) as srv:
        r = invoke("explain", atlas, "--explainer", "openai", "--base-url", f"{srv.url}/v1", "--features", "0,2",
                   "--retries", "0", "--concurrency", "1")  # fmt: skip
    assert r.exit_code == 1 and "#2: failed: malformed reply" in r.output and "1 failed" in r.output
    assert [x["feature"] for x in rows(atlas)] == [0]


def test_missing_key_and_unreachable_endpoint_fail_before_any_work(atlas: Path, monkeypatch) -> None:
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    r = invoke("explain", atlas, "--explainer", "anthropic")
    assert r.exit_code == 2 and "set ANTHROPIC_API_KEY or use --explainer stats" in r.output
    with ScriptedServer([Reply(200, openai_reply("x"))]) as srv:
        url = srv.url
    r = invoke("explain", atlas, "--explainer", "openai", "--base-url", f"{url}/v1", "--timeout", "0.5")
    assert r.exit_code == 2 and "cannot reach" in r.output and "--base-url" in r.output
    r = invoke("score", atlas, "--scorer", "simulation", "--backend", "openai", "--base-url", f"{url}/v1")
    assert r.exit_code == 2 and "cannot reach" in r.output
    assert rows(atlas) == []


def test_anthropic_explainer_over_http(atlas: Path, monkeypatch) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", "test-key")
    pytest.importorskip("anthropic", reason="the anthropic SDK is not installed: pip install 'lmscope[llm]'")
    with ScriptedServer([Reply(200, anthropic_reply("Label: digits", 300, 9))]) as srv:
        monkeypatch.setenv("ANTHROPIC_BASE_URL", srv.url)
        r = invoke("explain", atlas, "--explainer", "anthropic", "--model", "claude-sonnet-4-5", "--features", "0")
    assert r.exit_code == 0, r.output
    assert "$0.0010" in r.output  # 300 in at $3/M + 9 out at $15/M
    assert rows(atlas)[0]["explainer"] == "anthropic:claude-sonnet-4-5"


def test_web_route_sets_and_removes_human_labels(atlas: Path) -> None:
    from fastapi.testclient import TestClient

    from lmscope.web.app import create_app
    from lmscope.web.labels_api import router

    web = create_app(atlas)
    web.include_router(router)
    client = TestClient(web)
    invoke("explain", atlas, "--features", "0")
    r = client.put("/api/features/0/label", json={"text": "numerals", "author": "ana"})
    assert r.status_code == 200 and [x["source"] for x in r.json()] == ["human", "machine"]
    assert client.get("/api/features/0").json()["label"]["text"] == "numerals"
    labels = client.get("/api/features/0/labels").json()
    assert labels[1]["explainer"] == "stats" and labels[1]["scorer"] == "rule-detection"
    assert client.put("/api/features/999/label", json={"text": "x"}).status_code == 404
    assert client.put("/api/features/0/label", json={"text": ""}).status_code == 422
    assert [x["source"] for x in client.delete("/api/features/0/label").json()] == ["machine"]
