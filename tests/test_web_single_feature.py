"""'Test this feature' (Neuronpedia's box on a feature page): text typed on a feature page or in the inspector's
single-feature mode gets that feature's activation at every token, exactly the dictionary's encoding of the
model's activations; the inspector's view lives in its address (?text=...&feature=N) so it can be shared. The
browser half is in tests/test_web_fixes_browser.py."""

from __future__ import annotations

import html
from types import SimpleNamespace

import pytest
import torch
from fastapi.testclient import TestClient

from atlas_helpers import HOOK, make_tiny_atlas
from lmscope.web.app import Live, create_app


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("single")
    model, d, _, out = make_tiny_atlas(root, labels=True)
    client = TestClient(create_app(out, live=Live(model, d)), raise_server_exceptions=False)
    off = TestClient(create_app(out), raise_server_exceptions=False)
    return SimpleNamespace(model=model, d=d, out=out, client=client, off=off)


def test_one_feature_at_every_token_is_the_dictionarys_encoding(env) -> None:
    text = "The capital of France is Paris. The capital of Italy is Rome."
    all_feats = env.client.post("/api/inspect", json={"text": text}).json()
    assert "feature" not in all_feats or all_feats["feature"] is None
    assert all(t.get("focus") is None for t in all_feats["tokens"])
    ids = [t["token_id"] for t in all_feats["tokens"]]
    with env.model.capture([HOOK]) as acts, torch.no_grad():
        env.model(torch.tensor([ids]))
        z = env.d.encode(acts[HOOK].float())[0]
    fid = int(z[1:].amax(0).argmax())  # a feature that fires on this text
    r = env.client.post("/api/inspect", json={"text": text, "feature": fid})
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["feature"] == fid and [t["token_id"] for t in data["tokens"]] == ids
    focus = torch.tensor([t["focus"] for t in data["tokens"]])
    torch.testing.assert_close(focus, z[:, fid].float(), rtol=1e-5, atol=1e-6)
    assert float(focus[1:].max()) > 0
    # the scale it is coloured against: the feature's max activation over the atlas, and its label
    feat = env.client.get(f"/api/features/{fid}").json()
    assert data["feature_max_act"] == pytest.approx(feat["max_act"])
    assert (data["feature_label"] or {}).get("text") == (feat.get("label") or {}).get("text")


def test_a_feature_that_does_not_exist_is_refused(env) -> None:
    n = env.client.get("/api/overview").json()["features"]
    for bad in (n, -1, 2**63):
        r = env.client.post("/api/inspect", json={"text": "hello", "feature": bad})
        assert r.status_code in (404, 422), (bad, r.status_code, r.text)
        if r.status_code == 404:
            assert f"ids run from 0 to {n - 1}" in r.json()["detail"]
    assert env.client.post("/api/inspect", json={"text": "hello", "feature": "x"}).status_code == 422


def test_the_feature_page_has_the_test_box(env) -> None:
    page = env.client.get("/features/3").text
    assert "Test this feature" in page and 'id="inspect-form"' in page and 'data-feature="3"' in page
    assert 'href="/inspect?feature=3"' in page  # the shareable view
    off = env.off.get("/features/3").text
    assert 'id="test-off"' in off and "Testing is not available" in off


def test_the_inspector_opens_a_shared_view_from_its_address(env) -> None:
    text = 'a <b>"shared"</b> view & more'
    r = env.client.get("/inspect", params={"text": text, "feature": 5})
    assert r.status_code == 200
    assert f">{html.escape(text, quote=False)}</textarea>" in r.text.replace("&#34;", '"').replace("&quot;", '"')
    assert "<b>" not in r.text.split('id="inspect-text"')[1].split("</textarea>")[0]  # escaped, not markup
    assert 'id="inspect-feature"' in r.text and 'value="5"' in r.text and 'data-autorun="1"' in r.text
    assert "data-autorun" not in env.client.get("/inspect").text  # nothing to run without text
    assert "data-autorun" not in env.off.get("/inspect", params={"text": "x"}).text  # nor without a model
    n = env.client.get("/api/overview").json()["features"]
    for bad in (str(n), "1.5", "inf"):
        page = env.client.get("/inspect", params={"text": "x", "feature": bad})
        styled = {404: 'id="not-found"', 422: 'id="error-page"'}  # a styled page with a way back, not raw JSON
        assert page.status_code in styled and styled[page.status_code] in page.text, (bad, page.status_code)


def test_every_score_says_what_it_means(env) -> None:
    from lmscope.explain.scorers import SCORER_MEANINGS, score_meaning

    page = env.client.get("/features/3").text
    assert 'id="score-meanings"' in page and all(what in page for what in SCORER_MEANINGS.values())
    assert "0.5 is chance" in score_meaning("detection/rule") and score_meaning("detection/rule").startswith(
        "detection"
    )
    assert "held-out" in score_meaning(None) and "held-out" in score_meaning("custom")
    n = env.client.get("/api/overview").json()["features"]
    scored = next(
        (f, lab)
        for f in range(n)
        for lab in env.client.get(f"/api/features/{f}").json()["labels"]
        if lab["score"] is not None
    )  # the tiny atlas's labels are scored (make_tiny_atlas(labels=True))
    fid, lab = scored
    page = html.unescape(env.client.get(f"/features/{fid}").text)
    assert f'title="{score_meaning(lab["scorer"])}"' in page


def test_the_overview_leads_with_ce_recovered_and_explains_each_card(env, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import re

    from lmscope.web.pages import headline_cards

    ov = env.client.get("/api/overview").json()
    with_eval = {**ov, "metrics": {**ov["metrics"], "saved": {"eval.json": {"ce_recovered": 0.9377, "fvu": 0.3}}}}
    cards = headline_cards(with_eval)
    assert cards[0]["k"] == "CE recovered" and cards[0]["v"] == "0.938" and "clean model" in cards[0]["note"]
    assert headline_cards({**ov, "metrics": {**ov["metrics"], "saved": {}}})[0]["k"] == "FVU"
    assert all(c["note"] for c in cards)
    page = env.client.get("/").text
    shown = re.findall(r'<div class="k">([^<]+)</div><div class="v" id="[^"]+">[^<]*</div><div class="note', page)
    assert shown[:2] == (["CE recovered", "FVU"] if ov["metrics"].get("saved") else ["FVU", "L0"]), shown


def test_an_example_expands_to_its_whole_context(env) -> None:
    import sqlite3

    import numpy as np

    f = env.client.get("/api/features/3").json()
    ex = f["top_examples"][0]
    conn = sqlite3.connect(env.out)
    blob = conn.execute("SELECT tokens FROM contexts WHERE id = ?", (ex["context"],)).fetchone()[0]
    ids = np.frombuffer(blob, "<i4").tolist()
    assert len(ex["before"]) == ex["start"] and len(ex["before"]) + len(ex["tokens"]) + len(ex["after"]) == len(ids)
    whole = ex["before"] + ex["tokens"] + ex["after"]
    from lmscope.atlas.store import AtlasStore

    store = AtlasStore(env.out)
    assert whole == [store.token_text(t) for t in ids]  # the whole context, in order, as the atlas shows tokens
    assert ex["tokens"] == [store.token_text(t) for t in ex["token_ids"]]
    page = env.client.get("/features/3").text
    assert 'class="expand small"' in page and '<span class="more ctx" hidden>' in page
