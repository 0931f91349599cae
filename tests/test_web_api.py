"""The explorer's JSON API and pages through FastAPI's TestClient: documented JSON, 404s, injection, limits."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from atlas_helpers import HOOK, make_tiny_atlas
from lmscope.atlas import AtlasError
from lmscope.atlas.schema import SCHEMA_VERSION
from lmscope.web.app import MAX_INSPECT_CHARS, Live, create_app, load_live
from lmscope.web.steer_api import MAX_STEER_CHARS, MAX_STEER_TOKENS


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
    keys = {"id", "density", "n_fired", "mean_act", "max_act", "dead", "label", "relative_norm"}
    assert set(body["items"][0]) == keys
    assert all(it["relative_norm"] is None for it in body["items"])  # a one-model atlas: not a crosscoder
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
    assert lab["items"][0]["label"] == {
        "text": "capital cities", "source": "human", "score": None, "explainer": None, "scorer": None
    }  # fmt: skip
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
        "quantiles", "logit_effects", "logit_note", "neighbours", "cofire", "relative_norm", "crosscoder",
    }  # fmt: skip
    assert set(f) == expected
    assert f["crosscoder"] is None and f["relative_norm"] is None  # a one-model atlas
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
    assert body["hook"] == HOOK
    assert set(body) == {"model", "hook", "tokens", "feature", "feature_max_act", "feature_label"}
    assert body["feature"] is body["feature_max_act"] is body["feature_label"] is None  # no single feature asked for
    assert all(t["focus"] is None for t in body["tokens"])
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


# ---------------------------------------------------------------------- labels: explainer, scores, human edits
def _copy(out: Path, dst: Path) -> Path:
    import shutil

    shutil.copy(out, dst)
    return dst


def test_list_views_show_label_score_and_explainer(env) -> None:
    *_, live, _ = env
    items = {it["id"]: it for it in live.get("/api/features", params={"limit": 500}).json()["items"]}
    assert items[2]["label"] == {
        "text": "Python code", "source": "machine", "score": 0.8, "explainer": "test-explainer", "scorer": "detection"
    }  # fmt: skip
    page = live.get("/features", params={"q": "Python code", "by": "label"}).text
    assert "Python code" in page and "test-explainer" in page and "0.8" in page
    assert 'title="detection: balanced accuracy of a reader who' in page  # what the score means, beside the label
    spec = live.get("/api/openapi.json").json()["components"]["schemas"]
    assert {"explainer", "scorer"} <= set(spec["Label"]["properties"])
    # a neighbour view names the explainer of a labelled neighbour
    store = live.app.state.store
    fid = next(i for i in range(48) if any(n["id"] == 2 for n in store.feature(i)["neighbours"]))
    assert "test-explainer" in live.get(f"/features/{fid}").text


def test_human_label_from_the_feature_page(env, tmp_path: Path) -> None:
    import sqlite3

    from lmscope.explain.labels import open_rw, write_machine_label

    _, _, out, _, _ = env
    atlas = _copy(out, tmp_path / "edit.db")
    client = TestClient(create_app(atlas))
    page = client.get("/features/2").text
    assert 'id="label-form"' in page and 'id="human-label" class="muted"' in page
    r = client.put("/api/features/2/label", json={"text": "  python <source> code ", "author": "ana"})
    assert r.status_code == 200, r.text
    assert [(x["source"], x["text"]) for x in r.json()] == [("human", "python <source> code"),
                                                            ("machine", "Python code")]  # fmt: skip
    # the server's own connection stays read-only, and sees the write at once
    with pytest.raises(sqlite3.OperationalError, match=r"readonly|read-only"):
        client.app.state.store.conn.execute("DELETE FROM labels")
    feat = client.get("/api/features/2").json()
    assert feat["label"] == {"text": "python <source> code", "source": "human", "score": None, "explainer": "ana",
                             "scorer": None}  # fmt: skip
    page = client.get("/features/2").text
    assert '<p id="human-label"><span class="label human">python &lt;source&gt; code</span>' in page
    assert "<source>" not in page
    found = client.get("/api/search", params={"q": "source", "by": "label"}).json()
    assert [it["id"] for it in found["items"]] == [2]  # the FTS triggers followed
    # a correction replaces the human label; a machine run never touches it
    assert client.put("/api/features/2/label", json={"text": "Python source"}).status_code == 200
    conn = open_rw(atlas)
    write_machine_label(conn, 2, "code again", "test-explainer", 0.5, "detection")
    conn.close()
    labels = client.get("/api/features/2/labels").json()
    assert [(x["source"], x["text"]) for x in labels] == [("human", "Python source"), ("machine", "code again")]
    assert client.get("/api/search", params={"q": "python source", "by": "label"}).json()["total"] == 1
    assert client.get("/api/search", params={"q": "python code", "by": "label"}).json()["total"] == 0
    # errors are clear JSON
    assert client.put("/api/features/999/label", json={"text": "x"}).status_code == 404
    bad = client.put("/api/features/2/label", json={"text": "   "})
    assert bad.status_code == 422 and "empty" in bad.json()["detail"]
    assert client.put("/api/features/2/label", json={"text": "x" * 501}).status_code == 422
    assert client.get("/api/features/999/labels").status_code == 404
    r = client.delete("/api/features/2/label")
    assert r.status_code == 200 and [x["source"] for x in r.json()] == ["machine"]
    assert client.get("/api/search", params={"q": "python source", "by": "label"}).json()["total"] == 0


def test_read_only_server_refuses_label_writes(env, tmp_path: Path) -> None:
    _, _, out, _, _ = env
    atlas = _copy(out, tmp_path / "ro.db")
    before = hashlib.sha256(atlas.read_bytes()).hexdigest()
    client = TestClient(create_app(atlas, read_only=True))
    for r in (client.put("/api/features/1/label", json={"text": "x"}), client.delete("/api/features/1/label")):
        assert r.status_code == 403 and "--read-only" in r.json()["detail"]
    assert client.get("/api/features/1/labels").status_code == 200
    page = client.get("/features/1").text
    assert 'id="label-readonly"' in page and 'id="label-form"' not in page
    assert hashlib.sha256(atlas.read_bytes()).hexdigest() == before


class Served:
    """A real `lmscope serve` subprocess on 127.0.0.1 (see `_serve`); HTTP through urllib, never a proxy."""

    def __init__(self, proc: subprocess.Popen[bytes], url: str, out: Path, err: Path) -> None:
        self.proc, self.url, self.out, self.err = proc, url, out, err
        self.opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback only, no proxy

    def request(self, method: str, path: str, body: object = None) -> tuple[int, str, str]:
        """(status, content type, body text); HTTP errors are answers too."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"} if data else {})  # fmt: skip
        try:
            with self.opener.open(req, timeout=10) as r:
                return r.status, r.headers.get("Content-Type", ""), r.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.headers.get("Content-Type", ""), exc.read().decode()

    def json(self, method: str, path: str, body: object = None) -> tuple[int, Any]:
        status, ctype, text = self.request(method, path, body)
        assert ctype.startswith("application/json"), (method, path, status, ctype, text[:200])
        return status, json.loads(text)

    def output(self) -> tuple[str, str]:
        """The server's stdout (whitespace collapsed: rich wraps lines) and stderr, so far."""
        return " ".join(self.out.read_text().split()), self.err.read_text()


@contextlib.contextmanager
def _serve(atlas: Path, *flags: str, logs: Path, startup_s: float = 90.0) -> Iterator[Served]:
    """Run `python -m lmscope.cli.app serve ATLAS --no-live FLAGS` on a free loopback port until it answers
    /api/overview (at most `startup_s`), yield it, then stop it with SIGTERM (as a process manager would) and wait
    for it to exit (at most 30 s, then it is killed and the test fails). A port taken between choosing and binding
    is retried on another port (three tries)."""
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200", "NO_COLOR": "1"}
    for attempt in range(3):
        port = _free_port()
        out, err = logs / f"serve{attempt}.out", logs / f"serve{attempt}.err"
        cmd = [sys.executable, "-m", "lmscope.cli.app", "serve", str(atlas), "--host", "127.0.0.1", "--port",
               str(port), "--no-live", *flags]  # fmt: skip
        with out.open("wb") as fo, err.open("wb") as fe:
            proc = subprocess.Popen(cmd, stdout=fo, stderr=fe, stdin=subprocess.DEVNULL, env=env)
        served = Served(proc, f"http://127.0.0.1:{port}", out, err)
        try:
            deadline = time.monotonic() + startup_s
            while True:
                if proc.poll() is not None:
                    break
                try:
                    if served.request("GET", "/api/overview")[0] == 200:
                        break
                except OSError:  # not listening yet
                    pass
                if time.monotonic() > deadline:
                    pytest.fail(f"`lmscope serve` did not answer within {startup_s:.0f} s: {served.output()}")
                time.sleep(0.1)
            if proc.poll() is not None:
                stderr = served.output()[1]
                if "address already in use" in stderr.lower() and attempt < 2:
                    continue
                pytest.fail(f"`lmscope serve` exited with status {proc.returncode} before answering: {stderr}")
            yield served
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pytest.fail(f"`lmscope serve` did not stop within 30 s of SIGTERM: {served.output()}")
            return
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_serve_for_real(env, tmp_path: Path) -> None:
    """`lmscope serve` as a real process on a real port: pages and JSON over HTTP, label writes refused with
    --read-only (the atlas file stays byte for byte the same) and stored without it, a clean exit on SIGTERM."""
    import sqlite3

    _, _, out, _, _ = env
    atlas = _copy(out, tmp_path / "served.db")
    before = hashlib.sha256(atlas.read_bytes()).hexdigest()

    with _serve(atlas, "--read-only", logs=tmp_path / "ro") as s:
        status, ctype, page = s.request("GET", "/")
        assert status == 200 and ctype.startswith("text/html")
        assert '<div class="v" id="n-features">48</div>' in page
        status, feat = s.json("GET", "/api/features/1")
        assert status == 200 and feat["id"] == 1
        assert [(x["source"], x["text"]) for x in feat["labels"]] == [("human", "capital cities")]
        assert len(feat["top_examples"]) > 0 and feat["histogram"]["counts"]
        status, missing = s.json("GET", "/api/features/999")
        assert status == 404 and "does not exist" in missing["detail"]
        for method, body in (("PUT", {"text": "written while read-only"}), ("DELETE", None)):
            status, refused = s.json(method, "/api/features/1/label", body)
            assert status == 403 and "--read-only" in refused["detail"], refused
        assert 'id="label-readonly"' in s.request("GET", "/features/1")[2]
    stdout, stderr = s.output()
    assert s.proc.returncode == 0, (stdout, stderr)
    assert f"serving {atlas} at {s.url}" in stdout and "label editing off (--read-only)" in stdout
    assert stdout.endswith("stopped") and "Traceback" not in stderr, (stdout, stderr)
    assert hashlib.sha256(atlas.read_bytes()).hexdigest() == before  # the atlas itself was never written
    wal = atlas.with_name(atlas.name + "-wal")
    assert not wal.exists() or wal.stat().st_size == 0  # nor anything left pending in its write-ahead log

    with _serve(atlas, logs=tmp_path / "rw") as s:
        status, labels = s.json("PUT", "/api/features/1/label", {"text": "capitals, served for real"})
        assert status == 200 and ("human", "capitals, served for real") in [(x["source"], x["text"]) for x in labels]
        status, feat = s.json("GET", "/api/features/1")
        assert status == 200 and feat["label"]["text"] == "capitals, served for real"
        assert 'id="label-form"' in s.request("GET", "/features/1")[2]
    stdout, stderr = s.output()
    assert s.proc.returncode == 0 and "human labels editable" in stdout and stdout.endswith("stopped"), stderr
    conn = sqlite3.connect(atlas)  # on disk, after the server is gone
    rows = conn.execute("SELECT text FROM labels WHERE feature = 1 AND source = 'human'").fetchall()
    conn.close()
    assert rows == [("capitals, served for real",)]


def test_several_scores_per_label(env, tmp_path: Path) -> None:
    from lmscope.explain.labels import feature_labels, open_rw, set_score

    _, _, out, _, _ = env
    atlas = _copy(out, tmp_path / "scores.db")
    conn = open_rw(atlas)
    lid = feature_labels(conn, 2)[0]["id"]
    assert [s["scorer"] for s in feature_labels(conn, 2)[0]["scores"]] == ["detection"]  # add_label wrote it
    set_score(conn, lid, 0.55, "fuzzing", n=20)
    set_score(conn, lid, 0.7, "detection")  # replaces the (label, detection) row
    conn.close()
    client = TestClient(create_app(atlas))
    lab = client.get("/api/features/2").json()["labels"][0]
    assert lab["score"] == 0.7 and lab["scorer"] == "detection"  # the latest score, as in v1
    assert {s["scorer"]: (s["score"], s["n"]) for s in lab["scores"]} == {"detection": (0.7, None),
                                                                          "fuzzing": (0.55, 20)}  # fmt: skip
    page = client.get("/features/2").text
    assert '<span class="scorer">detection</span> <span class="num">0.7</span>' in page
    assert '<span class="scorer">fuzzing</span> <span class="num">0.55</span>' in page


def _downgrade_to_v1(path: Path) -> None:
    """Make a version-1 atlas the way lmscope 1 wrote it: no `scores` table, version 1."""
    import sqlite3

    from lmscope.atlas import add_label

    conn = sqlite3.connect(path)
    conn.execute("DROP TRIGGER labels_scores_delete")
    conn.execute("DROP TABLE scores")
    conn.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    conn.execute("PRAGMA user_version=1")
    add_label(conn, 3, "v1 scored", source="machine", explainer="old", score=0.9, scorer="rule-detection")
    conn.commit()
    conn.close()


def test_v1_atlas_reads_read_only_and_migrates_read_write(env, tmp_path: Path) -> None:
    import sqlite3

    from lmscope.atlas.schema import get_meta, has_table, open_atlas, set_meta
    from lmscope.explain.labels import open_rw

    _, _, out, _, _ = env
    atlas = _copy(out, tmp_path / "v1.db")
    _downgrade_to_v1(atlas)
    # read-only: served as it is, scores empty, nothing written
    client = TestClient(create_app(atlas))
    assert client.get("/api/overview").json()["schema_version"] == 1
    lab = next(x for x in client.get("/api/features/3").json()["labels"] if x["text"] == "v1 scored")
    assert lab["score"] == 0.9 and lab["scores"] == []
    assert "v1 scored" in client.get("/features/3").text
    # a human label from the explorer touches only `labels`: the file stays version 1
    assert client.put("/api/features/3/label", json={"text": "human on v1"}).status_code == 200
    conn = open_atlas(atlas)
    assert get_meta(conn, "schema_version") == 1 and not has_table(conn, "scores")
    conn.close()
    # read-write: migrated in place, old scores copied
    conn = open_rw(atlas)
    assert get_meta(conn, "schema_version") == SCHEMA_VERSION == 2
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 2
    sql = "SELECT s.scorer, s.score FROM scores s JOIN labels l ON l.id = s.label_id WHERE l.text = 'v1 scored'"
    rows = [tuple(r) for r in conn.execute(sql)]
    assert rows == [("rule-detection", 0.9)]
    # deleting a label deletes its scores (trigger added by the migration)
    conn.execute("DELETE FROM labels WHERE text = 'v1 scored'")
    conn.commit()
    assert conn.execute("SELECT count(*) FROM scores WHERE score = 0.9").fetchone()[0] == 0
    set_meta(conn, "schema_version", SCHEMA_VERSION + 1)  # newer files are still refused
    conn.commit()
    conn.close()
    with pytest.raises(AtlasError, match="upgrade lmscope"):
        create_app(atlas)
    with pytest.raises(AtlasError, match="upgrade lmscope"):
        open_rw(atlas)
    assert sqlite3.connect(atlas).execute("SELECT count(*) FROM labels WHERE text = 'human on v1'").fetchone()[0] == 1


# ---------------------------------------------------------------------- steering panel
def test_steer_runs_baseline_and_steered(env) -> None:
    from lmscope.model.generation import SamplingConfig, prompt_ids
    from lmscope.steer.edits import Edit, feature_readout, latent_edit_writer
    from lmscope.steer.measure import run_steering

    model, d, _, live, _ = env
    body = {"prompt": "The capital of France is", "mode": "add", "strength": 6.0, "max_new_tokens": 6, "seed": 3}
    r = live.post("/api/features/1/steer", json=body)
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["edit"] == "1=add:6" and got["hook"] == HOOK and got["max_new_tokens"] == 6
    assert set(got["measure"]) == {"activation_baseline", "activation_steered", "kl_first_position",
                                   "perplexity_baseline", "perplexity_steered"}  # fmt: skip
    assert got["measure"]["kl_first_position"] > 0
    # the same as lmscope.steer.edits run directly
    ids = prompt_ids(model, body["prompt"])
    ref = run_steering(model, {HOOK: latent_edit_writer(d, [Edit(1, "add", 6.0)])}, body["prompt"], ids, ["x"],
                       SamplingConfig(max_new_tokens=6, temperature=0.8), seed=3,
                       readout=feature_readout(d, HOOK, [1]))  # fmt: skip
    assert (got["baseline"], got["steered"]) == (ref.samples[0].baseline, ref.samples[0].steered)
    assert got["measure"]["activation_steered"] == pytest.approx(ref.measure["activation_steered"]["feature 1"])
    again = live.post("/api/features/1/steer", json=body).json()
    assert again["steered"] == got["steered"]  # seeded
    ab = live.post("/api/features/1/steer", json={**body, "mode": "ablate", "strength": 123}).json()
    assert ab["edit"] == "1=ablate" and ab["baseline"] == got["baseline"]


def test_steer_validates_input_and_caps_work(env) -> None:
    *_, live, browse = env
    ok = {"prompt": "Paris", "mode": "clamp", "strength": 2.0, "max_new_tokens": 4, "seed": 0}
    cases = [
        ({"mode": "amplify"}, "mode"), ({"max_new_tokens": MAX_STEER_TOKENS + 1}, "max_new_tokens"),
        ({"max_new_tokens": 0}, "max_new_tokens"), ({"prompt": "x" * (MAX_STEER_CHARS + 1)}, "prompt"),
        ({"prompt": ""}, "prompt"), ({"strength": "strong"}, "strength"), ({"seed": -1}, "seed"),
    ]  # fmt: skip
    for change, field in cases:
        r = live.post("/api/features/1/steer", json={**ok, **change})
        assert r.status_code == 422 and any(field in e["loc"] for e in r.json()["detail"]), (change, r.text)
    inf = live.post("/api/features/1/steer", content=json.dumps(ok).replace("2.0", "1e999"),
                    headers={"Content-Type": "application/json"})  # fmt: skip
    assert inf.status_code == 422 and "finite" in inf.text
    blank = live.post("/api/features/1/steer", json={**ok, "prompt": "   "})
    assert blank.status_code == 422 and "empty" in blank.json()["detail"]
    missing = live.post("/api/features/4800/steer", json=ok)
    assert missing.status_code == 404 and "does not exist" in missing.json()["detail"]
    off = browse.post("/api/features/1/steer", json=ok)
    assert off.status_code == 503 and "steering is not available" in off.json()["detail"]
    assert 'id="steer-off"' in browse.get("/features/1").text
    assert 'id="steer-off"' not in live.get("/features/1").text
    # one steering request at a time
    lock = live.app.state.live.steer_lock
    assert lock.acquire(blocking=False)
    try:
        busy = live.post("/api/features/1/steer", json=ok)
        assert busy.status_code == 429 and "another steering request" in busy.json()["detail"]
    finally:
        lock.release()
    assert live.post("/api/features/1/steer", json=ok).status_code == 200
    assert "/api/features/{fid}/steer" in live.get("/api/openapi.json").json()["paths"]
