"""The explorer in a real browser: headless Debian Chromium driven by Playwright against a live local server
(with a live tiny model: the inspector and the steering panel run for real).

Playwright never downloads a browser here: it launches /usr/bin/chromium (installed by `make browser`) or
$LMSCOPE_CHROMIUM. If either is missing, or Chromium will not start, the tests are skipped with the reason; in CI
(CI=true) they fail instead, with the reason and how to install what is missing (tests/browser_gate.py).
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import browser_gate
from atlas_helpers import make_tiny_atlas
from lmscope.web.app import Live, create_app

CHROMIUM = browser_gate.chromium_path(os.environ)
ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run", "--disable-quic",
]  # fmt: skip
ARTIFACTS = Path(__file__).parent / "artifacts"

sync_api: Any
try:
    from playwright import sync_api
except ImportError as exc:
    sync_api, PLAYWRIGHT_ERROR = None, str(exc)
else:
    PLAYWRIGHT_ERROR = None
MISSING = browser_gate.problem(PLAYWRIGHT_ERROR, CHROMIUM)
ACTION, WHY = browser_gate.decide(MISSING, os.environ)
if ACTION == "skip":  # outside CI; in CI the fixture below fails each test instead
    pytest.skip(WHY, allow_module_level=True)


@pytest.fixture(scope="module", autouse=True)
def _browser_available() -> None:
    """In CI a missing Playwright or Chromium fails every test here (before the server is built), with the reason."""
    browser_gate.enforce(MISSING)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def running(app: Any) -> Iterator[str]:
    """Serve `app` with uvicorn on a free local port, in a thread; yields its base URL, stops it on exit."""
    import uvicorn

    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not srv.started:
        if time.time() > deadline or not thread.is_alive():
            pytest.fail("the explorer server did not start within 20 s")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(timeout=10)


@contextlib.contextmanager
def local_page(base: str) -> Iterator[Any]:
    """A Chromium page that may only reach `base`: any request elsewhere is aborted and recorded in `page.outside`;
    page errors go to `page.errors`, and every request to `base` to `page.sent` ("METHOD /path")."""
    with sync_api.sync_playwright() as p:
        try:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        except Exception as exc:  # a broken Chromium install: skip saying why, or fail in CI; never pass quietly
            browser_gate.enforce(browser_gate.launch_problem(CHROMIUM, exc))
            raise  # not reached: enforce always skips or fails here
        ctx = browser.new_context(viewport={"width": 1300, "height": 1000})
        pg = ctx.new_page()
        pg.set_default_timeout(15_000)
        errors: list[str] = []
        pg.on("pageerror", lambda e: errors.append(str(e)))
        # the pages must not need the internet: any request off 127.0.0.1 fails the test
        outside: list[str] = []
        sent: list[str] = []
        pg.on("request", lambda r: sent.append(f"{r.method} {r.url.removeprefix(base)}"))
        pg.route(
            "**/*",
            lambda route: (
                route.continue_() if route.request.url.startswith(base) else (outside.append(route.request.url),
                                                                               route.abort())
            ),
        )  # fmt: skip
        pg.errors = errors
        pg.outside = outside
        pg.sent = sent
        try:
            yield pg
        finally:
            browser.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("browser")
    model, d, _, out = make_tiny_atlas(root, labels=True)
    with running(create_app(out, live=Live(model, d))) as url:
        yield url


@pytest.fixture(scope="module")
def page(server: str) -> Iterator[object]:
    with local_page(server) as pg:
        yield pg


def test_overview_search_feature_and_inspector(server: str, page) -> None:
    page.goto(server + "/")
    assert page.locator("#n-features").inner_text() == "48"
    page.wait_for_selector("#density-plot .main-svg")  # plotly drew the density histogram

    # search for a word from the header box
    page.fill("header input[name=q]", "Paris")
    page.press("header input[name=q]", "Enter")
    page.wait_for_url("**/features?*")
    rows = page.locator("#feature-table tbody tr a")
    assert rows.count() > 0
    assert "matching" in page.locator("#result-count").inner_text()

    # open a feature page: tokens highlighted by activation, histogram rendered, neighbour links
    rows.first.click()
    page.wait_for_url("**/features/*")
    page.wait_for_selector("#hist-plot .main-svg")
    assert page.locator("#hist-plot .main-svg .point, #hist-plot .main-svg .bars path").count() > 0
    lit = page.locator("#top-examples .tok.on")
    assert lit.count() > 0
    bg = lit.first.evaluate("el => getComputedStyle(el).backgroundColor")
    assert bg.startswith("rgba(255, 115, 0") or bg.startswith("rgb(255, 115, 0"), bg
    assert page.locator("#top-examples .tok.peak").count() == page.locator("#top-examples .example").count()
    assert page.locator("#logits td.pos").count() == 10
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "feature_page.png"), full_page=True)
    first_neighbour = page.locator("#neighbours a").first
    target = first_neighbour.get_attribute("href")
    first_neighbour.click()
    page.wait_for_url("**" + str(target))
    assert page.locator("h1").inner_text() == "Feature #" + str(target).rsplit("/", 1)[1]

    # unknown feature: a 404 page
    resp = page.goto(server + "/features/123456")
    assert resp is not None and resp.status == 404
    assert "does not exist" in page.locator("#not-found").inner_text()

    # the prompt inspector runs the model live
    page.goto(server + "/inspect")
    page.fill("#inspect-text", "The capital of France is Paris.")
    page.click("#inspect-go")
    page.wait_for_selector("#inspect-tokens .tok")
    toks = page.locator("#inspect-tokens .tok")
    assert toks.count() >= 5
    assert page.locator("#inspect-tokens .tok.on").count() > 0
    page.wait_for_selector("#inspect-detail a")  # the first token with features is selected
    assert "tokens" in page.locator("#inspect-status").inner_text()

    # oversized text is refused with a clear message (sent around the textarea's maxlength)
    page.evaluate("document.getElementById('inspect-text').removeAttribute('maxlength')")
    page.fill("#inspect-text", "x" * 2500)
    page.click("#inspect-go")
    page.wait_for_function("document.getElementById('inspect-status').textContent.includes('at most')")

    assert page.errors == []  # type: ignore[attr-defined]
    assert page.outside == []  # type: ignore[attr-defined]
    assert (ARTIFACTS / "feature_page.png").stat().st_size > 10_000


def test_human_label_and_steering_panel(server: str, page) -> None:
    """Set a human label on a feature page and see it after a reload (and in the list); steer the feature live."""
    page.goto(server + "/features/2")
    assert page.locator("#machine-labels").inner_text().startswith("Python code")
    assert "test-explainer" in page.locator("#machine-labels").inner_text()
    page.fill("#label-text", "snippets of <Python> code")
    page.fill("#label-author", "browser-test")
    page.click("#label-save")
    page.wait_for_function("document.getElementById('human-label').textContent.includes('snippets')")
    page.reload()
    assert page.locator("#human-label .label.human").inner_text() == "snippets of <Python> code"
    assert "by browser-test" in page.locator("#human-label").inner_text()
    assert page.locator("#machine-labels .label.machine").inner_text() == "Python code"  # kept apart, untouched
    assert page.locator(".fhead .label.human").inner_text() == "snippets of <Python> code"
    page.goto(server + "/features?q=snippets&by=label")
    assert page.locator("#feature-table tbody tr").count() == 1
    assert "browser-test" in page.locator("#feature-table tbody tr").inner_text()

    # the steering panel: baseline and steered side by side, with the measurements
    page.goto(server + "/features/1")
    page.fill("#steer-prompt", "The capital of France is")
    page.select_option("#steer-mode", "add")
    page.fill("#steer-strength", "8")
    page.fill("#steer-tokens", "6")
    page.click("#steer-go")
    page.wait_for_function("document.getElementById('steer-measure').rows.length === 4")
    assert "1=add:8" in page.locator("#steer-measure").inner_text()
    # every measurement with one line on what it means
    assert all(page.locator("#steer-measure tr").nth(i).locator("td").count() == 2 for i in range(4))
    assert "fluency cost" in page.locator("#steer-measure").inner_text()
    # then the feature's activation shaded on every token of both continuations (a clean read-back)
    page.wait_for_function("document.getElementById('steer-status').textContent.includes('shaded')")
    for box in ("#steer-baseline", "#steer-steered"):
        prompt = page.locator(f"{box} .tok.prompt")
        assert "".join(prompt.nth(i).inner_text() for i in range(prompt.count())).strip() == "The capital of France is"
        cont = page.locator(f"{box} .tok.cont")
        assert cont.count() > 0 and all(cont.nth(i).get_attribute("data-focus") for i in range(cont.count()))
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "feature_steer.png"), full_page=True)
    # a request over the cap is refused with the server's message (sent around the input's max)
    page.evaluate("document.getElementById('steer-tokens').removeAttribute('max')")
    page.fill("#steer-tokens", "500")
    page.click("#steer-go")
    page.wait_for_function("document.getElementById('steer-status').textContent.includes('max_new_tokens')")
    assert page.errors == []  # type: ignore[attr-defined]
    assert page.outside == []  # type: ignore[attr-defined]
