"""The explorer's JSON API and pages through FastAPI's TestClient: documented JSON, 404s, injection, limits."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from atlas_helpers import HOOK, make_tiny_atlas
from lmscope.atlas import AtlasError
from lmscope.atlas.schema import SCHEMA_VERSION
from lmscope.web.app import MAX_INSPECT_CHARS, Live, create_app, load_live


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("web")
    model, d, _, out = make_tiny_atlas(root, labels=True)
    live = TestClient(create_app(out, live=Live(model, d)))
    browse = TestClient(create_app(out))
    return model, d, out, live, browse


def test_overview(env) -> None:
    *_, live, _ = env
    r = live.get("/api/overview")
    assert r.status_code == 200
    ov = r.json()
    assert ov["schema_version"] == SCHEMA_VERSION and ov["features"] == 48
    assert ov["summary"]["hook"] == HOOK and ov["provenance"]["hook"] == HOOK
    assert sum(ov["density_histogram"]["counts"]) == 48 - ov["dead"]
    assert set(ov["metrics"]["atlas"]) >= {"fvu", "l0", "dead", "mse"}


def test_list_sort_filter_and_paging(env) -> None:
    *_, live, _ = env
    r = live.get("/api/features", params={"sort": "density", "order": "desc", "limit": 10})
    body = r.json()
    assert r.status_code == 200 and body["total"] == 48 and len(body["items"]) == 10
    dens = [it["density"] for it in body["items"]]
    assert dens == sorted(dens, reverse=True)
    assert set(body["items"][0]) == {"id", "density", "n_fired", "mean_act", "max_act", "dead", "label"}
    page2 = live.get("/api/features", params={"sort": "density", "order": "desc", "limit": 10, "offset": 10}).json()
    assert page2["items"][0]["density"] <= dens[-1]
    cut = dens[4]
    filt = live.get("/api/features", params={"min_density": cut, "sort": "max_act"}).json()
    assert all(it["density"] >= cut for it in filt["items"]) and filt["total"] >= 5
    acts = [it["max_act"] for it in filt["items"]]
    assert acts == sorted(acts)
    alive = live.get("/api/features", params={"dead": "false", "limit": 500}).json()
    assert all(not it["dead"] for it in alive["items"])
    assert live.get("/api/features", params={"sort": "nonsense"}).status_code == 422
    assert live.get("/api/features", params={"limit": 100000}).status_code == 422


def test_search_by_text_label_and_token(env) -> None:
    *_, live, _ = env
    r = live.get("/api/search", params={"q": "Paris"}).json()
    assert r["by"] == "text" and r["total"] > 0
    one = live.get(f"/api/features/{r['items'][0]['id']}").json()
    assert any("Paris" in ex["text"] for ex in one["top_examples"])
    lab = live.get("/api/search", params={"q": "capital cities", "by": "label"}).json()
    assert [it["id"] for it in lab["items"]] == [1]
    assert lab["items"][0]["label"] == {"text": "capital cities", "source": "human", "score": None}
    tok = live.get("/api/search", params={"q": "Paris", "by": "token"}).json()
    for it in tok["items"][:3]:
        feat = live.get(f"/api/features/{it['id']}").json()
        assert any(ex["tokens"][ex["peak"]].strip() == "Paris" for ex in feat["top_examples"])
    assert live.get("/api/search", params={"q": "zzzqqq-no-such-text"}).json()["total"] == 0


def test_search_input_is_never_sql(env) -> None:
    """SQL and FTS syntax in search input is inert; the atlas is unchanged afterwards (and read-only anyway)."""
    _, _, out, live, _ = env
    before = hashlib.sha256(Path(out).read_bytes()).hexdigest()
    attacks = [
        "'; DROP TABLE features; --",
        '" OR 1=1 --',
        "x') UNION SELECT id, text FROM labels --",
        "Paris\" OR text:*",
        "NEAR(a b) AND NOT *",
        "%' OR '1'='1",
        "1; ATTACH DATABASE '/tmp/pwn.db' AS pwn; --",
    ]
    for q in attacks:
        for by in ("text", "label", "token"):
            r = live.get("/api/search", params={"q": q, "by": by})
            assert r.status_code == 200, (q, by, r.text)
            assert r.json()["total"] == 0
            assert live.get("/api/features", params={"q": q, "by": by}).json()["total"] == 0
            assert live.get("/features", params={"q": q, "by": by}).status_code == 200
    assert live.get("/api/features").json()["total"] == 48
    assert not Path("/tmp/pwn.db").exists()
    assert hashlib.sha256(Path(out).read_bytes()).hexdigest() == before


def test_feature_json_matches_the_database(env) -> None:
    model, d, _, live, _ = env
    r = live.get("/api/features/1")
    assert r.status_code == 200
    f = r.json()
    expected = {
        "id", "label", "labels", "density", "n_fired", "mean_act", "max_act", "dead", "histogram", "top_examples",
        "quantiles", "logit_effects", "logit_note", "neighbours", "cofire",
    }  # fmt: skip
    assert set(f) == expected
    assert f["label"]["text"] == "capital cities"
    assert sum(f["histogram"]["counts"]) == f["n_fired"]
    assert len(f["histogram"]["edges"]) == len(f["histogram"]["counts"]) + 1
    ex = f["top_examples"][0]
    assert ex["act"] == pytest.approx(f["max_act"], rel=1e-5)
    assert len(ex["tokens"]) == len(ex["acts"]) == len(ex["token_ids"])
    assert ex["acts"][ex["peak"]] == pytest.approx(ex["act"], rel=1e-5)
    # the example's activations are those of a fresh run on its context's tokens
    store = live.app.state.store
    blob = store.conn.execute("SELECT tokens FROM contexts WHERE id = ?", (ex["context"],)).fetchone()[0]
    ctx = torch.from_numpy(np.frombuffer(blob, dtype="<i4").astype(np.int64))[None]
    with model.capture([HOOK]) as acts, torch.no_grad():
        model(ctx)
        z = d.encode(acts[HOOK])[0, :, 1]
    assert ex["acts"] == pytest.approx(z[ex["start"] : ex["start"] + len(ex["acts"])].tolist(), abs=1e-5)
    assert [n["id"] for n in f["neighbours"]][:1] and all(n["id"] != 1 for n in f["neighbours"])
    assert len(f["logit_effects"]["positive"]) == 10
    assert all(q["lo"] <= e["act"] <= q["hi"] for q in f["quantiles"] for e in q["examples"])


def test_unknown_feature_is_404_json_and_html(env) -> None:
    *_, live, _ = env
    r = live.get("/api/features/999999")
    assert r.status_code == 404 and "does not exist" in r.json()["detail"]
    page = live.get("/features/999999")
    assert page.status_code == 404 and "text/html" in page.headers["content-type"]
    assert "feature 999999 does not exist" in page.text
    assert live.get("/features/-1").status_code == 404
    assert live.get("/no/such/page").status_code == 404
    assert live.get("/api/features/abc").status_code == 422


def test_inspect_runs_the_model(env) -> None:
    model, d, _, live, _ = env
    r = live.post("/api/inspect", json={"text": "The capital of France is Paris."})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["hook"] == HOOK and set(body) == {"model", "hook", "tokens"}
    ids = [t["token_id"] for t in body["tokens"]]
    assert ids[0] == model.tokenizer.bos_token_id
    with model.capture([HOOK]) as acts, torch.no_grad():
        model(torch.tensor([ids]))
        z = d.encode(acts[HOOK])[0]
    for i, t in enumerate(body["tokens"]):
        want = {int(j) for j in (z[i] > 0).nonzero().flatten()}
        assert {f["id"] for f in t["features"]} == want  # k = 4 < 8 shown per token
        for f in t["features"]:
            assert f["act"] == pytest.approx(float(z[i, f["id"]]), rel=1e-5)
    labelled = [f for t in body["tokens"] for f in t["features"] if f["id"] == 1]
    if labelled:
        assert labelled[0]["label"]["text"] == "capital cities"


def test_inspect_refuses_oversized_and_empty_text_and_says_when_off(env) -> None:
    *_, live, browse = env
    r = live.post("/api/inspect", json={"text": "x" * (MAX_INSPECT_CHARS + 1)})
    assert r.status_code == 413 and f"at most {MAX_INSPECT_CHARS:,}" in r.json()["detail"]
    assert live.post("/api/inspect", json={"text": "   "}).status_code == 422
    off = browse.post("/api/inspect", json={"text": "hello"})
    assert off.status_code == 503 and "not available" in off.json()["detail"]
    page = browse.get("/inspect")
    assert page.status_code == 200 and 'id="inspector-off"' in page.text


def test_openapi_documents_the_api_and_pages_need_no_internet(env) -> None:
    *_, live, _ = env
    spec = live.get("/api/openapi.json").json()
    for path in ("/api/features", "/api/search", "/api/features/{fid}", "/api/inspect", "/api/overview"):
        assert path in spec["paths"]
    assert {"Feature", "FeatureList", "InspectResponse", "Example"} <= set(spec["components"]["schemas"])
    for url in ("/", "/features", "/features/1", "/inspect"):
        page = live.get(url)
        assert page.status_code == 200, url
        assert "http://" not in page.text and "https://" not in page.text, url
    js = live.get("/vendor/plotly.min.js")
    assert js.status_code == 200 and len(js.content) > 1_000_000
    assert live.get("/static/atlas.js").status_code == 200


def test_pages_escape_html(env, tmp_path: Path) -> None:
    import shutil
    import sqlite3

    from lmscope.atlas import add_label

    _, _, out, _, _ = env
    copy = tmp_path / "copy.db"
    shutil.copy(out, copy)
    conn = sqlite3.connect(copy)
    add_label(conn, 0, "<script>alert(1)</script>", source="human")
    conn.commit()
    conn.close()
    client = TestClient(create_app(copy))
    for url in ("/features/0", "/features?q=%3Cscript%3E&by=label"):
        text = client.get(url).text
        assert "<script>alert(1)</script>" not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    feature = client.get("/api/features/0").json()
    assert feature["label"]["text"] == "<script>alert(1)</script>"
    assert json.dumps(feature)  # plain JSON


def test_server_opens_read_only_and_refuses_bad_files(env, tmp_path: Path) -> None:
    import sqlite3

    *_, live, _ = env
    conn = live.app.state.store.conn
    with pytest.raises(sqlite3.OperationalError, match=r"readonly|read-only"):
        conn.execute("INSERT INTO labels (feature, text, source, created) VALUES (0, 'x', 'human', 'now')")
    with pytest.raises(AtlasError, match="does not exist"):
        create_app(tmp_path / "missing.db")
    live_pair, note = load_live(env[2], model="/no/such/model")
    assert live_pair is None and "cannot load" in note
