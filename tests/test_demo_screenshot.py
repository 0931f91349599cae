"""Renders the README's screenshot: a well-labelled feature page of the demo atlas, in headless Chromium.

Not part of `make test` (marker `readme`): after `make demo`, run `.venv/bin/pytest -m readme`. It needs the atlas
that `make demo` writes (runs/demo/atlas.db, or $LMSCOPE_DEMO_ATLAS) and skips, saying so, when there is none.
The screenshot goes to tests/artifacts/demo_feature_page.png (copied to docs/img/feature_page.png).
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from test_web_browser import ARGS, ARTIFACTS, CHROMIUM, _free_port, sync_api

ATLAS = Path(os.environ.get("LMSCOPE_DEMO_ATLAS", Path(__file__).parents[1] / "runs" / "demo" / "atlas.db"))


def _feature() -> int:
    """The best-scored feature whose label names visible tokens (not whitespace or line breaks)."""
    conn = sqlite3.connect(f"file:{ATLAS}?mode=ro", uri=True)
    row = conn.execute(
        r"""SELECT l.feature FROM labels l JOIN features f ON f.id = l.feature
            JOIN scores s ON s.label_id = l.id AND s.scorer = 'rule-detection'
            WHERE l.source = 'machine' AND l.text NOT LIKE '%line break%' AND l.text NOT LIKE '%\n%' ESCAPE '!'
              AND instr(l.text, char(10)) = 0 AND f.density > 0.001
            ORDER BY s.score DESC, f.density DESC LIMIT 1"""
    ).fetchone()
    conn.close()
    assert row is not None, "the demo atlas has no scored machine labels"
    return int(row[0])


@pytest.mark.readme
def test_render_demo_feature_page() -> None:
    import uvicorn

    from lmscope.web.app import create_app

    if not ATLAS.exists():
        pytest.skip(f"no demo atlas at {ATLAS}: run `make demo` first (this test only renders the README screenshot)")

    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(create_app(ATLAS), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started:
        assert time.time() < deadline and thread.is_alive(), "the explorer did not start"
        time.sleep(0.05)
    feature = _feature()
    try:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
            page = browser.new_page(viewport={"width": 1300, "height": 1000})
            page.goto(f"http://127.0.0.1:{port}/features/{feature}")
            page.wait_for_selector(".js-plotly-plot", timeout=15_000)
            assert page.locator("text=Top activations").count() == 1
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "demo_feature_page.png"), full_page=False)
            browser.close()
    finally:
        srv.should_exit = True
        thread.join(timeout=10)
