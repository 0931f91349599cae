"""Explorer bugs a researcher hits (the "explorer as a researcher expects it" issue), through FastAPI's TestClient:
empty filter boxes, inputs that gave a 500, HTML error pages, special tokens in colour scales and statistics,
blank / numeric / punctuation searches with snippets, the favicon, the inspector's limits and counts, and the
overview's metrics explained. The browser half is tests/test_web_fixes_browser.py.
"""

from __future__ import annotations

import json
import re
import shutil
import sqlite3
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from atlas_helpers import HOOK, make_tiny_atlas
from lmscope.dictionaries import DictConfig, build
from lmscope.web.app import MAX_INSPECT_CHARS, Live, create_app

HUGE = "9223372036854775808"  # 2**63: one past SQLite's largest integer
SPECIAL_IDS = {0, 1, 2}  # the tiny tokenizer's <pad>, <s>, </s>
BOS_RATIO = 9.05 / 7.89  # the numbers: BOS at 9.05 on a feature whose max activation is 7.89


def _patch_atlas(src: Path, dst: Path) -> dict[str, int]:
    """A copy of the tiny atlas with two hand-made features: `special` (a top example whose BOS, at context
    position 0, fires at BOS_RATIO x the feature's max activation) and `start` (every top example moved to
    context position 1). Returns their ids and `plain`, a feature with neither."""
    shutil.copy(src, dst)
    conn = sqlite3.connect(dst)
    rows = conn.execute(
        "SELECT e.rowid, e.feature, e.pos, e.start, e.acts, e.act, c.tokens, f.max_act FROM examples e "
        "JOIN contexts c ON c.id = e.context JOIN features f ON f.id = e.feature WHERE e.kind = 'top' "
        "ORDER BY e.feature, e.rank"
    ).fetchall()
    by_feature: dict[int, list[tuple]] = {}
    for r in rows:
        by_feature.setdefault(r[1], []).append(r)

    def special_max(fid: int) -> float:
        out = 0.0
        for kind_rows in conn.execute(
            "SELECT e.start, e.acts, c.tokens FROM examples e JOIN contexts c ON c.id = e.context WHERE e.feature = ?",
            (fid,),
        ):
            start, acts, toks = kind_rows
            a = np.frombuffer(acts, "<f4")
            t = np.frombuffer(toks, "<i4")[start : start + len(a)]
            out = max([out] + [float(x) for x, ti in zip(a, t, strict=True) if int(ti) in SPECIAL_IDS])
        return out

    def early(fid: int) -> int:
        return sum(r[2] <= 1 for r in by_feature[fid])

    special = next(f for f, rs in sorted(by_feature.items()) if any(r[3] == 0 for r in rs) and early(f) == 0)
    rid, _, _, _, acts, _, _, max_act = next(r for r in by_feature[special] if r[3] == 0)
    a = np.frombuffer(acts, "<f4").copy()
    a[0] = max_act * BOS_RATIO
    conn.execute("UPDATE examples SET acts = ? WHERE rowid = ?", (a.astype("<f4").tobytes(), rid))

    start = next(f for f, rs in sorted(by_feature.items()) if f != special and early(f) == 0 and len(rs) >= 3)
    for rid, _, _, _, _, act, _, _ in by_feature[start]:
        win = np.zeros(10, dtype="<f4")  # window of position 1: positions 0 .. 9 (before = 16, after = 8)
        win[1] = act
        conn.execute("UPDATE examples SET pos = 1, start = 0, acts = ? WHERE rowid = ?", (win.tobytes(), rid))
    conn.commit()
    plain = next(
        f for f, rs in sorted(by_feature.items())
        if f not in (special, start) and early(f) == 0 and special_max(f) < float(rs[0][7])
    )  # fmt: skip
    conn.close()
    return {"special": special, "start": start, "plain": plain}


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("webfix")
    model, d, _, out = make_tiny_atlas(root, labels=True)
    patched = root / "patched.db"
    ids = _patch_atlas(out, patched)
    client = TestClient(create_app(patched, live=Live(model, d)), raise_server_exceptions=False)
    return SimpleNamespace(model=model, d=d, out=out, patched=patched, ids=ids, client=client, root=root)


def _is_error_page(r, status: int) -> None:
    assert r.status_code == status, (r.status_code, r.text[:300])
    assert r.headers["content-type"].startswith("text/html"), r.headers["content-type"]
    assert 'id="error-page"' in r.text and '<link rel="stylesheet" href="/static/style.css">' in r.text
    assert 'href="/features"' in r.text  # a way back
    assert not r.text.lstrip().startswith("{")


# ------------------------------------------------------------------------------------------- the filter form
def test_empty_number_boxes_mean_not_set(env) -> None:
    c = env.client
    r = c.get("/features?q=Paris&by=text&sort=&order=desc&min_density=&max_density=&min_act=")
    assert r.status_code == 200, r.text[:300]
    assert "matching" in r.text and 'id="feature-table"' in r.text
    r = c.get("/features?q=&by=text&sort=&order=desc&min_density=&max_density=&min_act=&dead=true")
    assert r.status_code == 200 and "48 feature(s)" in r.text
    # the JSON API reads an empty number the same way
    body = c.get("/api/features?min_density=&max_density=&min_act=&max_act=").json()
    assert body["total"] == 48
    # a filled box still filters; a box that is not a number is a page that says so
    some = c.get("/features?min_density=0.05&dead=true")
    assert some.status_code == 200
    bad = c.get("/features?min_density=abc")
    _is_error_page(bad, 422)
    assert "min_density" in bad.text
    for v in ("nan", "1e999", "-inf"):
        _is_error_page(c.get(f"/features?min_act={v}"), 422)
        r = c.get(f"/api/features?min_act={v}")
        assert r.status_code == 422 and r.headers["content-type"] == "application/json"


# ---------------------------------------------------------------------------------------- inputs that were 500s
def test_huge_feature_ids_are_not_found(env) -> None:
    c = env.client
    r = c.get(f"/api/features/{HUGE}")
    assert r.status_code == 404 and "does not exist" in r.json()["detail"]
    r = c.get(f"/features/{HUGE}")
    assert r.status_code == 404 and "text/html" in r.headers["content-type"] and "does not exist" in r.text
    assert c.get(f"/api/features/{HUGE}/labels").status_code == 404
    assert c.get(f"/api/features/-{HUGE}").status_code == 404
    r = c.get("/api/features", params={"offset": HUGE})
    assert r.status_code in (200, 422) and r.headers["content-type"] == "application/json"
    if r.status_code == 200:
        assert r.json()["items"] == []


def test_nul_in_a_search_is_a_clear_error(env) -> None:
    c = env.client
    for by in ("text", "label", "token"):
        r = c.get("/api/search", params={"q": "\x00", "by": by})
        assert r.status_code == 422 and "NUL" in r.json()["detail"], r.text
        r = c.get("/api/search", params={"q": "Par\x00is", "by": by})
        assert r.status_code == 422, r.text
        r = c.get("/api/features", params={"q": "\x00", "by": by})
        assert r.status_code == 422 and "NUL" in r.json()["detail"], r.text
        r = c.get("/features", params={"q": "\x00", "by": by})
        _is_error_page(r, 422)
        assert "NUL" in r.text


def test_a_label_with_nul_is_refused(env, tmp_path: Path) -> None:
    from lmscope.atlas import AtlasError
    from lmscope.atlas.db.labels import add_label, feature_labels
    from lmscope.explain.labels import open_rw, set_human_label, write_machine_label
    from lmscope.explain.ops import ExplainError

    atlas = tmp_path / "nul.db"
    shutil.copy(env.out, atlas)
    client = TestClient(create_app(atlas), raise_server_exceptions=False)
    r = client.put("/api/features/3/label", json={"text": "bad\x00label"})
    assert r.status_code == 422 and "NUL" in str(r.json()["detail"]), r.text
    assert client.put(f"/api/features/{HUGE}/label", json={"text": "x"}).status_code == 404
    assert client.get("/api/features/3/labels").json() == []
    conn = open_rw(atlas)
    with pytest.raises(ExplainError, match="NUL"):
        set_human_label(conn, 3, "bad\x00label")
    with pytest.raises(AtlasError, match="NUL"):
        add_label(conn, 3, "bad\x00label")
    assert feature_labels(conn, 3) == []
    # a machine label quotes token text: a control character in it is written as a visible escape
    write_machine_label(conn, 3, "the token \x00 and \x01", "test-explainer")
    assert [lab["text"] for lab in feature_labels(conn, 3)] == ["the token \\x00 and \\x01"]
    conn.close()


# -------------------------------------------------------------------------------------------- HTML error pages
def test_bad_input_to_a_page_is_a_styled_page(env) -> None:
    c = env.client
    for url in ("/features/abc", "/features?page=0", "/features?sort=bogus", "/features?order=sideways",
                "/features?by=colour", "/features?page=x"):  # fmt: skip
        r = c.get(url)
        _is_error_page(r, 422)
        assert 'id="error-list"' in r.text
    r = c.get("/features?sort=bogus")
    assert "sort" in r.text and "bogus" in r.text
    # the page names the bad value escaped
    r = c.get("/features", params={"sort": "<b>x</b>"})
    assert "<b>x</b>" not in r.text and "&lt;b&gt;x&lt;/b&gt;" in r.text
    # the JSON API keeps JSON errors
    for url in ("/api/features/abc", "/api/features?sort=bogus", "/api/features?offset=-1"):
        r = c.get(url)
        assert r.status_code == 422 and r.headers["content-type"] == "application/json"
        assert isinstance(r.json()["detail"], list)
    r = c.get("/api/features/123456")
    assert r.status_code == 404 and r.json() == {"detail": "feature 123456 does not exist; ids run from 0 to 47"}
    r = c.get("/features/123456")
    assert r.status_code == 404 and 'id="not-found"' in r.text


# ------------------------------------------------------------------------------------------- special tokens
def test_special_tokens_are_marked_greyed_and_out_of_the_scale(env) -> None:
    c = env.client
    fid = env.ids["special"]
    f = c.get(f"/api/features/{fid}").json()
    for ex in f["top_examples"] + [e for q in f["quantiles"] for e in q["examples"]]:
        assert ex["special"] == [t in SPECIAL_IDS for t in ex["token_ids"]]
    ex = next(e for e in f["top_examples"] if e["start"] == 0)
    assert ex["special"][0] and ex["acts"][0] > f["max_act"]  # the BOS is above the feature's max ...
    assert not ex["special"][ex["peak"]]
    page = c.get(f"/features/{fid}").text
    spans = re.findall(r'<span class="tok[^"]*"[^>]*>', page)
    special = [s for s in spans if "special" in s.split('"')[1]]
    assert special, "special tokens are marked"
    for s in special:  # ... and greyed, out of the colour scale
        assert "rgba(255, 115, 0" not in s and "--a:" not in s and " on" not in s.split('"')[1]
    # the flag says the feature fires more strongly on special tokens than on any text token
    flag = re.search(r'<p class="warn" id="position-flag">(.*?)</p>', page, re.S)
    assert flag and "special token" in flag.group(1)
    assert f"{ex['acts'][0]:.3g}" in flag.group(1) and f"{f['max_act']:.3g}" in flag.group(1)


def test_special_ids_of_an_atlas_that_does_not_record_them(env, tmp_path: Path) -> None:
    from lmscope.atlas.store import AtlasStore

    assert AtlasStore(env.out).special_ids == SPECIAL_IDS  # recorded by the build
    old = tmp_path / "old.db"
    shutil.copy(env.out, old)
    conn = sqlite3.connect(old)
    prov = json.loads(conn.execute("SELECT value FROM meta WHERE key = 'provenance'").fetchone()[0])
    del prov["special_token_ids"]
    conn.execute("UPDATE meta SET value = ? WHERE key = 'provenance'", (json.dumps(prov),))
    conn.commit()
    conn.close()
    store = AtlasStore(old)
    assert store.special_ids == SPECIAL_IDS  # "<pad>", "<s>", "</s>" read as special tokens; <s> starts every context
    ex = store.feature(env.ids["plain"])["top_examples"][0]  # type: ignore[index]
    assert ex["special"] == [t in SPECIAL_IDS for t in ex["token_ids"]]


def test_features_that_fire_at_the_start_are_flagged(env) -> None:
    c = env.client
    start, plain = env.ids["start"], env.ids["plain"]
    f = c.get(f"/api/features/{start}").json()
    assert all(ex["pos"] == 1 for ex in f["top_examples"])
    page = c.get(f"/features/{start}").text
    flag = re.search(r'<p class="warn" id="position-flag">(.*?)</p>', page, re.S)
    assert flag and "position 0/1" in flag.group(1)
    assert 'id="position-flag"' not in c.get(f"/features/{plain}").text
    # the feature list flags it too
    items = c.get("/features", params={"sort": "id", "order": "asc", "dead": "true"}).text
    row = re.search(rf'<tr[^>]*><td><a href="/features/{start}">#{start}</a>.*?</tr>', items, re.S)
    assert row and 'class="flag"' in row.group(0)
    row = re.search(rf'<tr[^>]*><td><a href="/features/{plain}">#{plain}</a>.*?</tr>', items, re.S)
    assert row and 'class="flag"' not in row.group(0)


def test_inspector_marks_special_tokens_and_counts_active_features(env) -> None:
    model = env.model
    d16 = build(DictConfig(arch="topk", d_in=32, d_sae=48, k=16, hook=HOOK, model="tiny-llama"), seed=1)
    with torch.no_grad():
        d16.b_enc.fill_(0.5)
    client = TestClient(create_app(env.patched, live=Live(model, d16)), raise_server_exceptions=False)
    r = client.post("/api/inspect", json={"text": "The capital of France is Paris."})
    assert r.status_code == 200, r.text
    toks = r.json()["tokens"]
    assert toks[0]["special"] is True and toks[0]["token_id"] == model.tokenizer.bos_token_id
    assert not any(t["special"] for t in toks[1:])
    ids = [t["token_id"] for t in toks]
    with model.capture([HOOK]) as acts, torch.no_grad():
        model(torch.tensor([ids]))
        z = d16.encode(acts[HOOK])[0]
    for i, t in enumerate(toks):
        n = int((z[i] > 0).sum())
        assert t["n_active"] == n and len(t["features"]) == min(8, n)
    assert any(t["n_active"] > len(t["features"]) for t in toks)  # "showing 8 of 16"


def test_inspector_states_its_limit(env) -> None:
    page = env.client.get("/inspect").text
    area = re.search(r"<textarea id=\"inspect-text\"[^>]*>", page)
    assert area and "maxlength" not in area.group(0)  # a long paste is not cut silently ...
    assert 'id="inspect-count"' in page and f"{MAX_INSPECT_CHARS:,}" in page  # ... the limit is shown
    r = env.client.post("/api/inspect", json={"text": "x" * 20_000})
    assert r.status_code == 413 and "20,000" in r.json()["detail"] and f"{MAX_INSPECT_CHARS:,}" in r.json()["detail"]


# ---------------------------------------------------------------------------------------------------- search
def test_a_blank_query_is_no_query(env) -> None:
    c = env.client
    for q in (" ", "   ", "\t"):
        r = c.get("/api/search", params={"q": q})
        assert r.status_code == 422 and "blank" in r.json()["detail"]
        body = c.get("/api/features", params={"q": q, "limit": 500}).json()
        assert body["total"] == 48 and [it["id"] for it in body["items"]] == list(range(48))
        page = c.get("/features", params={"q": q, "dead": "true"}).text
        count = re.search(r'<p class="muted" id="result-count">(.*?)</p>', page, re.S)
        assert count and "matching" not in count.group(1) and "48 feature(s)" in count.group(1)


def test_a_numeric_query_offers_the_feature(env) -> None:
    c = env.client
    page = c.get("/features", params={"q": "7"}).text
    goto = re.search(r'<p[^>]*id="goto-feature"[^>]*>(.*?)</p>', page, re.S)
    assert goto and 'href="/features/7"' in goto.group(1)
    assert c.get("/api/search", params={"q": "7"}).json()["feature"] == 7
    assert c.get("/api/search", params={"q": " 47 "}).json()["feature"] == 47
    assert c.get("/api/search", params={"q": "48"}).json()["feature"] is None  # no such feature
    assert c.get("/api/search", params={"q": "Paris"}).json()["feature"] is None
    assert 'id="goto-feature"' not in c.get("/features", params={"q": "48"}).text
    r = c.get("/features", params={"q": "#7"}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/features/7"


def _top_texts(c: TestClient, fid: int) -> list[str]:
    return [ex["text"] for ex in c.get(f"/api/features/{fid}").json()["top_examples"]]


@pytest.mark.parametrize("q", ["(", "+ 1", "print(", "):", ".", "x + 1"])
def test_punctuation_finds_example_text(env, q: str) -> None:
    c = env.client
    r = c.get("/api/search", params={"q": q, "limit": 500}).json()
    assert r["total"] > 0, q
    for it in r["items"][:5]:
        assert any(q.lower() in t.lower() for t in _top_texts(c, it["id"])), (q, it["id"])
    assert c.get("/api/search", params={"q": "<<<no such text>>>"}).json()["total"] == 0


def test_punctuation_in_a_python_corpus(tmp_path: Path) -> None:
    """`>>>`, `==` and `(` in example text, at the access layer: the trigram index finds them (shorter text by a
    scan), and so does an atlas without that index."""
    from lmscope.atlas.db import read
    from lmscope.atlas.db import write as db_write
    from lmscope.atlas.db.schema import create, open_atlas

    texts = {0: [">>> print(x)", ">>> import os"], 1: ["if a == b:", "x == (y)"], 2: ["a city of Paris", "Paris is"]}
    path = tmp_path / "py.db"
    conn = create(path)
    db_write.insert_contexts(conn, 0, np.zeros((1, 8), dtype=np.int64))
    db_write.commit(conn)
    feats = [(f, 1, 0.1, 1.0, 1.0, 0, '{"width": 1.0, "counts": [1]}', None, "[]", "[]") for f in texts]
    acts = np.ones(2, dtype="<f4").tobytes()
    examples = [(f, "top", -1, r, 0, 1, 1.0, 0, acts, 0, t) for f, ts in texts.items() for r, t in enumerate(ts)]
    db_write.write_build(conn, ["<s>"], feats, examples, [], {"summary": {"d_sae": 3}})
    conn.close()
    want = {">>>": [0], "==": [1], "(": [0, 1], "== (": [1], "paris": [2], "PRINT(": [0], "zz": []}
    conn = open_atlas(path)
    assert read.has_trigram_index(conn)
    assert {q: read.features_matching(conn, q, "example", 10) for q in want} == want
    conn.close()
    raw = sqlite3.connect(path)
    raw.execute("DROP TABLE search_trigram")
    raw.execute("DROP TRIGGER examples_search_trigram")
    raw.commit()
    raw.close()
    conn = open_atlas(path)
    assert not read.has_trigram_index(conn)
    assert {q: read.features_matching(conn, q, "example", 10) for q in want} == want
    conn.close()


def test_an_atlas_without_the_trigram_index_still_searches(env, tmp_path: Path) -> None:
    old = tmp_path / "old.db"
    shutil.copy(env.out, old)
    conn = sqlite3.connect(old)
    conn.execute("DROP TABLE IF EXISTS search_trigram")  # as an atlas written before the index existed
    conn.execute("DROP TRIGGER IF EXISTS examples_search_trigram")
    conn.commit()
    conn.close()
    new = TestClient(create_app(env.out), raise_server_exceptions=False)
    client = TestClient(create_app(old), raise_server_exceptions=False)
    for q in ("(", "print(", "+ 1", "Paris", "capital of"):
        a = client.get("/api/search", params={"q": q, "limit": 500}).json()
        b = new.get("/api/search", params={"q": q, "limit": 500}).json()
        assert a["total"] > 0, q
        assert {it["id"] for it in a["items"]} <= {it["id"] for it in b["items"]} or q in ("Paris", "capital of")
    assert client.get("/api/search", params={"q": "capital cities", "by": "label"}).json()["total"] == 1


def test_results_show_a_highlighted_snippet(env) -> None:
    c = env.client
    r = c.get("/api/search", params={"q": "paris"}).json()
    assert r["total"] > 0
    for it in r["items"]:
        s = it["snippet"]
        assert s["hit"].lower() == "paris"
        assert any((s["pre"] + s["hit"] + s["post"]).strip("…") in t for t in _top_texts(c, it["id"]))
    page = c.get("/features", params={"q": "paris"}).text
    assert re.search(r'<td class="snippet">[^<]*<mark>Paris</mark>', page)
    # the text around the match is escaped: the BOS text "<s>" never becomes a tag
    page = c.get("/features", params={"q": "<s>"}).text
    assert "<mark>&lt;s&gt;</mark>" in page and "<mark><s></mark>" not in page
    assert "<s>" not in page.split('id="feature-table"')[1]


# ------------------------------------------------------------------------------------------------ minor
def test_favicon_is_served(env) -> None:
    c = env.client
    page = c.get("/").text
    link = re.search(r'<link rel="icon"[^>]*href="([^"]+)"', page)
    assert link
    for url in (link.group(1), "/favicon.ico"):
        r = c.get(url)
        assert r.status_code == 200 and r.headers["content-type"].startswith("image/svg+xml"), url
        assert r.text.lstrip().startswith("<svg")


def test_overview_explains_each_metric(env, tmp_path: Path) -> None:
    atlas = tmp_path / "eval.db"
    shutil.copy(env.out, atlas)
    conn = sqlite3.connect(atlas)
    metrics = json.loads(conn.execute("SELECT value FROM meta WHERE key = 'metrics'").fetchone()[0])
    metrics["saved"] = {"eval.json": {
        "tokens": 2048, "fvu": 0.2, "mse": 0.0009, "l0": 4.0, "dead_frac": 0.125, "cosine": 0.9, "rel_bias": 0.97,
        "density_hist": {"log10_bin_edges": list(range(-8, 1)), "counts": [0, 0, 0, 0, 1, 5, 30, 6], "dead": 6},
        "ce_clean": 3.1, "ce_spliced": 3.4, "ce_recovered": 0.8, "kl_spliced": 0.2, "hook": HOOK,
    }}  # fmt: skip
    conn.execute("UPDATE meta SET value = ? WHERE key = 'metrics'", (json.dumps(metrics),))
    conn.commit()
    conn.close()
    page = TestClient(create_app(atlas)).get("/").text
    assert "log10_bin_edges" not in page and '{"tokens"' not in page  # not dumped raw

    def table(name: str) -> dict[str, str]:
        body = re.search(rf'<table class="kv metrics" id="{name}">(.*?)</table>', page, re.S)
        assert body, name
        rows = re.findall(r'<tr><th>([^<]+)</th><td class="num">([^<]*)</td><td class="note">([^<]+)</td></tr>',
                          body.group(1))  # fmt: skip
        assert rows and all(note.strip() for _, _, note in rows), name
        return {n: note for n, _, note in rows}

    build_, saved = table("atlas-metrics"), table("saved-metrics")
    assert "per token" in build_["mse"] and "per element" in saved["mse"]  # the two MSEs, told apart
    assert "d_in" in build_["mse"] + saved["mse"]
    assert "atlas build" in build_["dead"] and "eval" in saved["dead"]  # the two dead counts, told apart
    assert {"fvu", "l0", "tokens"} <= set(build_) and {"fvu", "ce_recovered", "dead_frac"} <= set(saved)
