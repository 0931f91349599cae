"""The feature map (/map) in a real browser: every live feature drawn as a point coloured by its family, the hover
label, a click that opens the feature's page, the family list that picks a family out, the level selector, the
feature page's link to its family, and the "no map" page of an atlas without families.

Headless Debian Chromium driven by Playwright against a live local server (tiny atlases). One browser for the module;
any request off 127.0.0.1 fails the test. Outside CI, skipped with the reason when Playwright or Chromium is missing;
in CI, failed (tests/browser_gate.py).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import replace
from types import SimpleNamespace

import pytest

from atlas_helpers import CFG, make_tiny_atlas
from lmscope.atlas import build_atlas
from lmscope.atlas.db.families import families_meta
from lmscope.atlas.db.schema import open_atlas
from lmscope.web.app import create_app

# the same gate as tests/test_web_browser.py: skipped with the reason outside CI, failing in CI (browser_gate.py)
from test_web_browser import ARTIFACTS, _browser_available, local_page, running  # noqa: F401


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    root = tmp_path_factory.mktemp("browser-map")
    model, _, corpus, atlas = make_tiny_atlas(root, labels=True)
    bare = build_atlas(model, root / "dict", str(corpus), out=root / "bare.db", config=replace(CFG, families=False),
                       progress=False)  # fmt: skip
    conn = open_atlas(atlas)
    meta = families_meta(conn)
    conn.close()
    with running(create_app(atlas)) as url, running(create_app(bare)) as bare_url:
        yield SimpleNamespace(url=url, bare_url=bare_url, meta=meta, atlas=atlas)


@pytest.fixture(scope="module")
def page(server: SimpleNamespace) -> Iterator[object]:
    with local_page(server.url) as pg:
        yield pg
    assert pg.errors == [] and pg.outside == []


def _open(server: SimpleNamespace, page, path: str = "/map") -> None:
    page.goto(server.url + path)
    page.wait_for_selector("#map-plot[data-ready='1']")


def _opacities(page) -> list[float]:
    return page.evaluate("() => document.getElementById('map-plot').data[0].marker.opacity")


def test_an_atlas_without_families_says_how_to_add_them(server) -> None:
    # first in the module: a page of its own (one Playwright at a time), closed before the shared `page` opens
    with local_page(server.bare_url) as pg:
        pg.goto(server.bare_url + "/map")
        assert "lmscope families" in pg.locator("#map-none").inner_text()
        assert pg.locator("#map-plot").count() == 0
        assert pg.errors == [] and pg.outside == []


def test_the_static_export_draws_the_map_from_disk(server, tmp_path) -> None:
    # a page of its own too, before the shared `page` opens: the site opened over file://, no server
    from lmscope.web.static_site import export_static

    export_static(server.atlas, tmp_path / "site", limit=20)
    base = (tmp_path / "site").resolve().as_uri() + "/"
    with local_page(base) as pg:
        pg.goto(base + "features/1.html")
        pg.locator("#families a").last.click()
        pg.wait_for_selector("#map-plot[data-ready='1']")
        assert pg.locator("#map-plot .scatterlayer path.point").count() == server.meta["live"]
        assert pg.locator("#family-list details.picked").count() == 1
        member = pg.locator("#family-list details.picked ul.members a").first
        href = member.get_attribute("href") or ""
        assert re.fullmatch(r"features/(\d+)\.html|features/index\.html", href), href
        member.click()
        pg.wait_for_load_state()
        assert pg.url.startswith(base + "features/")
        assert pg.errors == [] and pg.outside == []


def test_the_map_draws_every_live_feature_coloured_by_family(server, page) -> None:
    page.goto(server.url + "/")
    page.click("#nav-map")
    page.wait_for_url("**/map")
    page.wait_for_selector("#map-plot[data-ready='1']")
    meta = server.meta
    assert page.locator("#map-plot .scatterlayer path.point").count() == meta["live"] == 48
    level = len(meta["levels"]) // 2  # the page opens on the middle level
    assert page.locator("#map-level").input_value() == str(level)
    assert page.locator("#family-list details").count() == meta["levels"][level]
    colours = page.evaluate("() => document.getElementById('map-plot').data[0].marker.color")
    assert len(set(colours)) == meta["levels"][level]  # one colour per family (fewer families than the palette)
    assert page.locator("#map-quality tbody tr").count() == len(meta["levels"])
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "map_page.png"), full_page=True)


def test_hover_names_the_feature_and_click_opens_it(server, page) -> None:
    _open(server, page)
    box = page.locator("#map-plot .scatterlayer path.point").nth(3).bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(x, y)
    tip = page.locator("#map-plot .hoverlayer .hovertext")
    tip.wait_for()
    m = re.search(r"#(\d+)", tip.text_content() or "")
    assert m and "family" in (tip.text_content() or "")
    page.mouse.click(x, y)
    page.wait_for_url(f"**/features/{m.group(1)}")
    assert page.locator("h1").inner_text() == f"Feature #{m.group(1)}"


def test_the_family_list_picks_a_family_out(server, page) -> None:
    _open(server, page)
    first = page.locator("#family-list details").first
    fid = first.get_attribute("data-family")
    size = int(first.locator(".num").first.inner_text())
    first.locator("summary").click()
    page.wait_for_selector(f"#map-plot[data-picked='{fid}']")
    assert first.evaluate("d => d.open") and "picked" in (first.get_attribute("class") or "")
    assert sum(o > 0.5 for o in _opacities(page)) == size
    assert first.locator("ul.members li").count() == size
    page.click("#map-clear")
    page.wait_for_selector("#map-plot[data-picked='']")
    assert all(o > 0.5 for o in _opacities(page))
    # the coarsest level: fewer families, and the list follows
    page.select_option("#map-level", "0")
    assert page.locator("#family-list details").count() == server.meta["levels"][0]
    page.fill("#map-find", "#1")
    page.press("#map-find", "Enter")
    page.wait_for_selector("#family-list details.picked")
    assert "holds #1" in page.locator("#map-status").inner_text()


def test_the_feature_page_links_to_its_family_on_the_map(server, page) -> None:
    page.goto(server.url + "/features/1")
    links = page.locator("#families a")
    assert links.count() == len(server.meta["levels"])
    href = links.last.get_attribute("href") or ""
    fid = href.rsplit("-", 1)[1]
    links.last.click()
    page.wait_for_url(f"**/map#family-{fid}")
    page.wait_for_selector(f"#map-plot[data-picked='{fid}']")
    assert page.locator(f"#fam-{fid}").evaluate("d => d.open")
    assert page.locator("#map-level").input_value() == str(len(server.meta["levels"]) - 1)
    assert "#1" in page.locator(f"#fam-{fid} ul.members").inner_text()
    assert page.evaluate("() => window.scrollY") == 0  # the list scrolls to the family, the page keeps the map
