"""The explorer's attribution-graph view through FastAPI's TestClient: the graph list and documents under /api/graphs,
slugs that name no file outside the graphs directory, supernodes saved into the file (and refused when bad or when
the explorer is read-only), the pages /graphs and /graphs/{slug}, and an explorer started without a graphs
directory. The browser half is tests/test_web_graph_browser.py.
"""

from __future__ import annotations

import copy
import html
import json
import math
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient

from atlas_helpers import make_tiny_atlas
from circuit_helpers import write_tiny_graph_json
from lmscope.circuits.export import read_neuronpedia
from lmscope.errors import LmscopeError
from lmscope.web.app import create_app

SLUG = "tiny-graph"


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("webgraph")
    _, _, _, atlas = make_tiny_atlas(root)
    source = root / "source"
    write_tiny_graph_json(source, SLUG)
    return SimpleNamespace(root=root, atlas=atlas, source=source / f"{SLUG}.json")


@pytest.fixture()
def graphs(env: SimpleNamespace, tmp_path: Path) -> Path:
    """A graphs directory of this test's own: the tiny graph, two files that are not graphs and one that is ignored."""
    d = tmp_path / "graphs"
    d.mkdir()
    shutil.copy(env.source, d / f"{SLUG}.json")
    (d / "broken.json").write_text("{not json")
    (d / "partial.json").write_text(json.dumps({"metadata": {}, "nodes": []}))
    (d / "notes.txt").write_text("not a graph, not a .json file")
    return d


@pytest.fixture()
def client(env: SimpleNamespace, graphs: Path) -> TestClient:
    return TestClient(create_app(env.atlas, graphs=graphs), raise_server_exceptions=False)


def _doc(graphs: Path) -> dict:
    return read_neuronpedia(graphs / f"{SLUG}.json")


def _embedded(page: str) -> dict:
    m = re.search(r'<script type="application/json" id="graph-data">(.*?)</script>', page, re.S)
    assert m, "the page embeds no graph JSON"
    return json.loads(m.group(1))


def _features(doc: dict) -> list[dict]:
    return [n for n in doc["nodes"] if n["feature_type"] == "cross layer transcoder"]


# ------------------------------------------------------------------------------------------------ the JSON API
def test_list_graphs(client: TestClient, graphs: Path) -> None:
    r = client.get("/api/graphs")
    assert r.status_code == 200, r.text
    body = r.json()
    doc = _doc(graphs)
    assert body["directory"] == str(graphs) and body["exists"] is True
    assert [g["slug"] for g in body["graphs"]] == [SLUG]
    g = body["graphs"][0]
    assert g["prompt"] == doc["metadata"]["prompt"] and g["title"] == SLUG
    assert g["n_nodes"] == len(doc["nodes"]) > 0 and g["n_links"] == len(doc["links"]) > 0
    assert g["scores"] == doc["metadata"]["lmscope"]["scores"]
    assert set(g["scores"]) == {"unpruned", "pruned"} and set(g["scores"]["pruned"]) == {"replacement", "completeness"}
    assert g["node_threshold"] == doc["metadata"]["node_threshold"] and g["n_supernodes"] == 0
    bad = {u["file"]: u["reason"] for u in body["unreadable"]}
    assert set(bad) == {"broken.json", "partial.json"}  # notes.txt is not a .json file: not listed at all
    assert "not a readable graph JSON" in bad["broken.json"]
    assert "qParams" in bad["partial.json"]
    spec = client.get("/api/openapi.json").json()
    assert {"/api/graphs", "/api/graphs/{slug}", "/api/graphs/{slug}/supernodes"} <= set(spec["paths"])


def test_list_sees_a_changed_file_and_skips_bad_names(client: TestClient, graphs: Path) -> None:
    assert client.get("/api/graphs").json()["graphs"][0]["n_supernodes"] == 0
    node = _features(_doc(graphs))[0]["node_id"]
    assert client.post(f"/api/graphs/{SLUG}/supernodes", json={"supernodes": [["g", node]]}).status_code == 200
    assert client.get("/api/graphs").json()["graphs"][0]["n_supernodes"] == 1  # not a stale cached summary
    shutil.copy(graphs / f"{SLUG}.json", graphs / "has space.json")
    body = client.get("/api/graphs").json()
    assert [g["slug"] for g in body["graphs"]] == [SLUG]
    assert "not a slug" in {u["file"]: u["reason"] for u in body["unreadable"]}["has space.json"]


def test_get_graph(client: TestClient, graphs: Path) -> None:
    r = client.get(f"/api/graphs/{SLUG}")
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    assert r.json() == _doc(graphs)


def test_unknown_slug_is_404_with_a_message(client: TestClient) -> None:
    for url in ("/api/graphs/nope", "/api/graphs/broken.json", "/api/graphs/notes"):
        r = client.get(url)
        assert r.status_code == 404 and r.headers["content-type"] == "application/json", url
        assert "no graph" in r.json()["detail"] and "/graphs lists" in r.json()["detail"]
    r = client.post("/api/graphs/nope/supernodes", json={"supernodes": []})
    assert r.status_code == 404 and "no graph 'nope'" in r.json()["detail"]
    page = client.get("/graphs/nope")
    assert page.status_code == 404 and "text/html" in page.headers["content-type"]
    assert "no graph" in page.text and 'id="not-found"' in page.text


def test_a_file_that_is_not_a_graph_is_a_clear_error(client: TestClient) -> None:
    r = client.get("/api/graphs/broken")
    assert r.status_code == 409 and "cannot be shown" in r.json()["detail"]
    page = client.get("/graphs/partial")
    assert page.status_code == 409 and 'id="error-page"' in page.text and "qParams" in page.text


def test_bad_slug_is_422(client: TestClient) -> None:
    for slug in ("bad%20slug", "a" * 101, "semi%3Bcolon", "star*", "%00"):
        r = client.get(f"/api/graphs/{slug}")
        assert r.status_code == 422 and r.headers["content-type"] == "application/json", (slug, r.text)
        assert r.json()["detail"][0]["loc"] == ["path", "slug"]
        assert client.post(f"/api/graphs/{slug}/supernodes", json={"supernodes": []}).status_code == 422
    page = client.get("/graphs/bad%20slug")
    assert page.status_code == 422 and 'id="error-page"' in page.text and "slug" in page.text


def test_no_path_traversal(client: TestClient, graphs: Path) -> None:
    # a valid graph just outside the graphs directory, which no request may read or write
    outside = graphs.parent / "secret.json"
    doc = _doc(graphs)
    doc["metadata"]["prompt"] = "SECRET-PROMPT"
    outside.write_text(json.dumps(doc))
    before = outside.read_bytes()
    attempts = ["..%2Fsecret", "%2E%2E%2Fsecret", "..%5Csecret", "%2e%2e", "..", "%2F..%2Fsecret",
                "..%2F..%2Fgraphs%2Ftiny-graph", "....%2F%2Fsecret", "%252e%252e%252fsecret"]  # fmt: skip
    for a in attempts:
        r = client.get(f"/api/graphs/{a}")
        assert r.status_code in (404, 422), (a, r.status_code)
        assert "SECRET-PROMPT" not in r.text, a
        p = client.post(f"/api/graphs/{a}/supernodes", json={"supernodes": []})
        assert p.status_code in (404, 405, 422), (a, p.status_code)
        page = client.get(f"/graphs/{a}")
        assert "SECRET-PROMPT" not in page.text, a
        if page.url.path.startswith("/graphs/"):  # not "/graphs/.." that the client itself resolved to "/"
            assert page.status_code in (404, 422), (a, page.status_code)
    assert outside.read_bytes() == before
    assert "SECRET-PROMPT" not in client.get("/api/graphs").text


def test_supernodes_are_saved_and_read_back(client: TestClient, graphs: Path) -> None:
    feats = [n["node_id"] for n in _features(_doc(graphs))]
    groups = [["say a number", feats[0], feats[1]], ["<b>early</b> & co", feats[2]]]
    r = client.post(f"/api/graphs/{SLUG}/supernodes", json={"supernodes": groups})
    assert r.status_code == 200, r.text
    assert r.json() == {"slug": SLUG, "supernodes": groups}
    assert _doc(graphs)["qParams"]["supernodes"] == groups  # on disk
    assert client.get(f"/api/graphs/{SLUG}").json()["qParams"]["supernodes"] == groups
    assert client.get("/api/graphs").json()["graphs"][0]["n_supernodes"] == 2
    page = client.get(f"/graphs/{SLUG}").text
    assert _embedded(page)["qParams"]["supernodes"] == groups
    assert "<b>early</b>" not in page  # the label is data in the JSON block, escaped
    # removing one saves the list without it; an empty list removes them all
    assert client.post(f"/api/graphs/{SLUG}/supernodes", json={"supernodes": groups[1:]}).status_code == 200
    assert _doc(graphs)["qParams"]["supernodes"] == groups[1:]
    assert client.post(f"/api/graphs/{SLUG}/supernodes", json={"supernodes": []}).json()["supernodes"] == []
    assert _doc(graphs)["qParams"]["supernodes"] == []
    # the rest of the file is unchanged
    rest = copy.deepcopy(_doc(graphs))
    original = read_neuronpedia(graphs.parent / "graphs" / f"{SLUG}.json")
    assert rest == original and len(rest["nodes"]) == len(_embedded(page)["nodes"])


@pytest.mark.parametrize(
    ("supernodes", "message"),
    [
        ([["a group", "no-such-node"]], "names nodes not in this graph"),
        ([["   ", "FEATURE"]], "non-empty label"),
        ([["only a label"]], "at least one node"),
        ([[]], "at least one node"),
        (["not a list"], "[label, node_id"),
        ([["a", 3]], "[label, node_id"),
    ],
)
def test_bad_supernodes_are_422_with_the_message(
    client: TestClient, graphs: Path, supernodes: list, message: str
) -> None:
    feature = _features(_doc(graphs))[0]["node_id"]
    body = json.loads(json.dumps(supernodes).replace("FEATURE", feature))
    before = (graphs / f"{SLUG}.json").read_bytes()
    r = client.post(f"/api/graphs/{SLUG}/supernodes", json={"supernodes": body})
    assert r.status_code == 422 and r.headers["content-type"] == "application/json"
    assert message in r.json()["detail"], r.text
    assert (graphs / f"{SLUG}.json").read_bytes() == before


def test_malformed_supernode_requests_are_422(client: TestClient, graphs: Path) -> None:
    before = (graphs / f"{SLUG}.json").read_bytes()
    for body in ({}, {"supernodes": "x"}, {"supernodes": None}, [["a", "b"]]):
        r = client.post(f"/api/graphs/{SLUG}/supernodes", json=body)
        assert r.status_code == 422 and isinstance(r.json()["detail"], list), body
    r = client.post(
        f"/api/graphs/{SLUG}/supernodes", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert r.status_code == 422
    assert (graphs / f"{SLUG}.json").read_bytes() == before


def test_read_only_refuses_supernodes(env: SimpleNamespace, graphs: Path) -> None:
    client = TestClient(create_app(env.atlas, graphs=graphs, read_only=True))
    feature = _features(_doc(graphs))[0]["node_id"]
    before = (graphs / f"{SLUG}.json").read_bytes()
    r = client.post(f"/api/graphs/{SLUG}/supernodes", json={"supernodes": [["a", feature]]})
    assert r.status_code == 403 and "read-only" in r.json()["detail"]
    assert (graphs / f"{SLUG}.json").read_bytes() == before
    assert client.get(f"/api/graphs/{SLUG}").status_code == 200  # reading still works
    page = client.get(f"/graphs/{SLUG}").text
    assert 'id="supernode-readonly"' in page and 'data-read-only="true"' in page
    assert re.search(r'<button type="submit" id="supernode-save" disabled>', page)


def test_an_unwritable_graph_file_is_409(client: TestClient, graphs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import lmscope.circuits.export as export

    def refuse(*_a: object, **_k: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(export, "atomic_write_json", refuse)
    feature = _features(_doc(graphs))[0]["node_id"]
    r = client.post(f"/api/graphs/{SLUG}/supernodes", json={"supernodes": [["a", feature]]})
    assert r.status_code == 409 and "cannot be written" in r.json()["detail"]


# ------------------------------------------------------------------------------------- without a graphs directory
def test_without_a_graphs_directory(env: SimpleNamespace) -> None:
    client = TestClient(create_app(env.atlas))
    for url in ("/api/graphs", f"/api/graphs/{SLUG}"):
        r = client.get(url)
        assert r.status_code == 404 and r.headers["content-type"] == "application/json"
        assert "--graphs" in r.json()["detail"] and "lmscope circuit" in r.json()["detail"]
    assert client.post(f"/api/graphs/{SLUG}/supernodes", json={"supernodes": []}).status_code == 404
    page = client.get("/graphs")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert '<link rel="stylesheet" href="/static/style.css">' in page.text and 'id="graphs-off"' in page.text
    text = html.unescape(page.text)
    assert "lmscope circuit MODEL --transcoders tc/" in text and "lmscope serve ATLAS --graphs graphs/" in text
    assert 'href="/graphs"' not in page.text  # no nav link to a view that is off
    assert 'href="/graphs"' not in client.get("/").text
    one = client.get(f"/graphs/{SLUG}")
    assert one.status_code == 404 and "--graphs" in html.unescape(one.text)


def test_empty_or_missing_graphs_directory(env: SimpleNamespace, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    page = TestClient(create_app(env.atlas, graphs=empty)).get("/graphs")
    assert page.status_code == 200 and 'id="graphs-none"' in page.text
    assert "lmscope circuit MODEL" in html.unescape(page.text)
    missing = TestClient(create_app(env.atlas, graphs=tmp_path / "not-yet"))
    assert missing.get("/api/graphs").json() == {"directory": str(tmp_path / "not-yet"), "exists": False,
                                                 "graphs": [], "unreadable": []}  # fmt: skip
    assert "does not exist yet" in missing.get("/graphs").text
    a_file = tmp_path / "file.json"
    a_file.write_text("{}")
    with pytest.raises(LmscopeError, match="not a directory"):
        create_app(env.atlas, graphs=a_file)


# ------------------------------------------------------------------------------------------------ the pages
def test_pages_render_with_the_graph(client: TestClient, graphs: Path) -> None:
    doc = _doc(graphs)
    listing = client.get("/graphs")
    assert listing.status_code == 200
    assert f'href="/graphs/{SLUG}"' in listing.text and 'id="graph-table"' in listing.text
    assert 'id="graphs-unreadable"' in listing.text and "broken.json" in listing.text
    assert 'id="nav-graphs"' in listing.text and 'id="nav-graphs"' in client.get("/").text
    r = client.get(f"/graphs/{SLUG}")
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    page = r.text
    assert _embedded(page) == doc
    for elem in ('id="graph-svg"', 'id="prune-slider"', 'id="graph-counts"', 'id="node-tooltip"', 'id="node-panel"',
                 'id="supernode-label"', 'id="supernode-save"', 'id="supernode-list"', 'id="select-mode"',
                 'src="/static/graph.js"', 'id="graph-scores"', 'id="graph-targets"'):  # fmt: skip
        assert elem in page, elem
    slider = re.search(r'<input type="range" id="prune-slider" min="([\d.]+)" max="([\d.]+)"', page)
    assert slider and float(slider.group(1)) == pytest.approx(0.1)
    # up to the file's node threshold, or a little past it to its most influential kept node: the boundary node
    # that pruning keeps can be just above the threshold, and the page starts by showing every node of the file
    top = max(n["influence"] for n in doc["nodes"] if n["feature_type"] not in ("embedding", "logit"))
    threshold = doc["metadata"]["node_threshold"]
    assert float(slider.group(2)) == pytest.approx(max(threshold, math.ceil(top * 1000) / 1000))
    assert float(slider.group(2)) < threshold + 0.01
    scores = doc["metadata"]["lmscope"]["scores"]
    for which in ("unpruned", "pruned"):
        for name in ("replacement", "completeness"):
            cell = re.search(rf'id="score-{name}-{which}">([^<]*)<', page)
            assert cell and float(cell.group(1)) == pytest.approx(scores[which][name], rel=1e-2)
    targets = re.search(r'<ul id="graph-targets">(.*?)</ul>', page, re.S)
    assert targets and targets.group(1).count("<li>") == len(doc["metadata"]["lmscope"]["targets"])
    assert "http://" not in page and "https://" not in page
    js = client.get("/static/graph.js")
    assert js.status_code == 200 and "prune-slider" in js.text


def test_page_escapes_text_from_the_file(env: SimpleNamespace, tmp_path: Path) -> None:
    d = tmp_path / "graphs"
    d.mkdir()
    doc = read_neuronpedia(env.source)
    evil = "</script><script>alert(1)</script>"
    doc["metadata"]["prompt"] = evil
    doc["metadata"]["lmscope"]["targets"][0]["label"] = evil
    _features(doc)[0]["clerp"] = evil
    doc["nodes"][0]["activation"] = float("nan")  # JSON has no NaN: the page and the API send null
    (d / "evil.json").write_text(json.dumps(doc))
    client = TestClient(create_app(env.atlas, graphs=d))
    page = client.get("/graphs/evil").text
    assert "<script>alert(1)" not in page
    back = _embedded(page)
    assert back["metadata"]["prompt"] == evil and back["nodes"][0]["activation"] is None
    api = client.get("/api/graphs/evil")
    assert api.status_code == 200 and api.json()["nodes"][0]["activation"] is None
    assert "<script>alert(1)" not in client.get("/graphs").text
