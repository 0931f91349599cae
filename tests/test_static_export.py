"""`lmscope export ATLAS --static OUT`: the explorer as files. Every link of every page resolves inside the site
(it works from disk and from any folder), the pages are the explorer's own, read-only, the feature JSON is the
atlas's, the in-browser search index matches it, and bad requests are refused without touching OUT. A browser
opens the site from disk and searches it."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from atlas_helpers import make_tiny_atlas
from lmscope.atlas.store import AtlasStore
from lmscope.web import static_site
from lmscope.web.static_site import ExportError, export_static

LINKS = re.compile(r'(?:href|src|action)="([^"]*)"')


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("static")
    _, _, _, atlas = make_tiny_atlas(root, labels=True)
    site = root / "site"
    summary = export_static(atlas, site)
    return SimpleNamespace(root=root, atlas=atlas, site=site, summary=summary, store=AtlasStore(atlas))


def _links(page: Path) -> list[str]:
    return LINKS.findall(page.read_text())


def test_every_link_of_every_page_resolves_inside_the_site(env) -> None:
    pages = sorted(env.site.rglob("*.html"))
    n = env.store.n_features
    assert env.summary["features"] == n and len(pages) == n + 3  # overview, list, map, one page per feature
    for page in pages:
        for link in _links(page):
            assert not link.startswith("/"), f"{page}: absolute link {link}"
            if link == "#" or link.startswith(("#", "http:", "https:", "data:")):
                continue
            target = (page.parent / link.split("?")[0].split("#")[0]).resolve()
            assert target.is_file(), f"{page.relative_to(env.site)} links {link}, which is not in the site"
            assert env.site.resolve() in target.parents


def test_pages_are_the_explorers_own_and_read_only(env) -> None:
    page = (env.site / "features" / "3.html").read_text()
    f = env.store.feature(3)
    assert f is not None and "Feature #3" in page and 'id="top-examples"' in page
    assert 'id="static-note"' in page and 'id="label-readonly"' in page
    for live_only in ('id="steer-form"', 'id="label-form"', 'id="inspect-form"', 'Inspector</a>'):
        assert live_only not in page
    home = (env.site / "index.html").read_text()
    assert 'id="overview-cards"' in home and 'id="density-data"' in home
    assert (env.site / "vendor" / "plotly.min.js").is_file() and (env.site / "static" / "style.css").is_file()
    assert oct(env.site.stat().st_mode & 0o777) == "0o755"


def test_the_json_and_the_search_index_are_the_atlas(env) -> None:
    for fid in (0, 3, env.store.n_features - 1):
        saved = json.loads((env.site / "api" / "features" / f"{fid}.json").read_text())
        assert saved == json.loads(json.dumps(env.store.feature(fid)))
    index = json.loads((env.site / "features" / "index.json").read_text())
    js = (env.site / "features" / "index.js").read_text()
    assert js.startswith("window.LMSCOPE_FEATURES = ") and json.loads(js.split("= ", 1)[1].rstrip(";\n")) == index
    assert [r["id"] for r in index] == list(range(env.store.n_features))
    f3 = env.store.feature(3)
    assert f3 is not None and index[3]["max_act"] == f3["max_act"]
    assert index[3]["label"] == (f3["label"] or {}).get("text") and index[3]["text"] == f3["top_examples"][0]["text"]


def test_bad_requests_are_refused_and_out_is_untouched(env, tmp_path: Path, monkeypatch) -> None:
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="not an empty folder"):
        export_static(env.atlas, busy)
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]
    with pytest.raises(ExportError, match="at least 1"):
        export_static(env.atlas, tmp_path / "zero", limit=0)
    monkeypatch.setattr(static_site, "MAX_STATIC_FEATURES", 10)
    with pytest.raises(ExportError, match="--limit 10"):
        export_static(env.atlas, tmp_path / "big")
    assert not (tmp_path / "big").exists() and not list(tmp_path.glob(".big.*"))
    # --limit: the first N pages; links to the others go to the list, which says what is exported
    small = export_static(env.atlas, tmp_path / "small", limit=5)
    assert small["features"] == 5 and len(list((tmp_path / "small" / "features").glob("[0-9]*.html"))) == 5
    for page in (tmp_path / "small" / "features").glob("*.html"):
        for link in _links(page):
            m = re.fullmatch(r"(\d+)\.html", link)
            assert m is None or int(m.group(1)) < 5, (page.name, link)
    assert "5 of the atlas's 48 features" in (tmp_path / "small" / "features" / "index.html").read_text()


def test_the_cli_writes_the_site(env, tmp_path: Path) -> None:
    from lmscope.cli.app import app

    r = CliRunner().invoke(app, ["export", str(env.atlas), "--static", str(tmp_path / "cli"), "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "wrote 48 of 48 features" in r.output and (tmp_path / "cli" / "index.html").is_file()
    r = CliRunner().invoke(app, ["export", str(tmp_path / "none.db"), "--static", str(tmp_path / "x")])
    assert r.exit_code != 0 and "no atlas at" in r.output


def test_a_browser_opens_the_site_from_disk_and_searches_it(env) -> None:
    import browser_gate
    from test_web_browser import MISSING, local_page  # skips this test outside CI when no browser; fails in CI

    browser_gate.enforce(MISSING)
    base = env.site.resolve().as_uri() + "/"
    f3 = env.store.feature(3)
    assert f3 is not None
    word = f3["top_examples"][0]["text"].split()[0]
    with local_page(base) as page:
        page.goto(base + "features/index.html?q=%233")
        page.wait_for_selector("#feature-table tbody tr")
        assert page.locator("#feature-table tbody tr").count() == 1 and "1 matching" in page.inner_text("#result-count")
        page.fill("#q", word)
        page.wait_for_function(f"document.getElementById('result-count').textContent.includes('{word}')")
        assert page.locator("#feature-table tbody tr").count() >= 1
        page.fill("#q", "#3")
        page.wait_for_function("document.querySelectorAll('#feature-table tbody tr').length === 1")
        page.click("#feature-table tbody tr a")
        page.wait_for_selector("#top-examples .example")
        assert page.url == base + "features/3.html"
        assert page.eval_on_selector("body", "el => getComputedStyle(el).fontFamily") != ""  # the stylesheet loaded
        page.click("header nav a:has-text('Overview')")
        page.wait_for_selector("#overview-cards")
        assert page.errors == [] and page.outside == []
