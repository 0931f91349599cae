"""The atlas explorer: a FastAPI app serving HTML pages and a JSON API (under /api) for one atlas file.

    from lmscope.web.app import create_app
    app = create_app("atlas.db")                       # browse only
    app = create_app("atlas.db", live=Live(model, d))  # plus the live prompt inspector and steering panel
    app = create_app("atlas.db", read_only=True)       # no human-label editing either
    app = create_app("atlas.db", graphs="graphs/")     # plus the attribution-graph view of graphs/*.json
    app = create_app("atlas.db", diffs="diffs/")       # plus the model-diff view of diffs/*/report.json
    app = create_app("atlas.db", match="match.json")   # plus each feature's partners from `lmscope match`

The atlas is opened read-only; human labels set from the feature page are written through a separate
short-lived connection that touches only the `labels` table (web/labels_api.py), unless `read_only`.
Nothing is fetched from the internet: the pages use local CSS/JS and the plotly bundle that ships inside the
`plotly` Python package.

This module only assembles the app; what the routes share (`Live`, the limits, the state accessors) is in
web/state.py, which every route module imports instead of this one.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmscope._version import __version__
from lmscope.atlas.store import AtlasStore
from lmscope.errors import LmscopeError
from lmscope.web import api, audit_api, diff_api, graph_api, labels_api, map_api, match_api, pages, steer_api
from lmscope.web.state import MAX_FEATURES_PER_TOKEN, MAX_INSPECT_CHARS, Live, install, load_live

STATIC = Path(__file__).parent / "static"

__all__ = ["MAX_FEATURES_PER_TOKEN", "MAX_INSPECT_CHARS", "Live", "create_app", "load_live", "plotly_js"]


def _json_safe(obj: Any) -> Any:
    """`obj` with non-finite floats written as strings ('inf', 'nan'), which JSON cannot carry."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    return obj


def _is_api(request: Request) -> bool:
    """Whether a request is for the JSON API (which answers errors in JSON; the pages answer styled pages)."""
    return request.url.path.startswith("/api/")


def plotly_js() -> Path | None:
    try:
        import plotly
    except ImportError:
        return None
    p = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
    return p if p.is_file() else None


def create_app(
    atlas: str | Path, live: Live | None = None, live_note: str | None = None, read_only: bool = False,
    graphs: str | Path | None = None, diffs: str | Path | None = None, audits: str | Path | None = None,
    match: str | Path | None = None, partner_url: str | None = None,
) -> FastAPI:  # fmt: skip
    """The explorer for `atlas`; `live` enables the prompt inspector and steering; `read_only` turns off the
    routes that write (human labels, supernodes: they answer 403); `graphs`, a directory of attribution-graph JSON
    files (`lmscope circuit ... --out DIR/NAME.json`), turns on the graph view at /graphs (a directory that does
    not exist yet is allowed: the view lists no graphs until one is written there); `diffs`, a directory of
    model-diff reports (`lmscope diff ... --out DIR/NAME`, one subdirectory each), turns on the diff view at /diffs
    (likewise allowed not to exist yet); `audits`, a directory of audit reports (`lmscope audit ... --out DIR/NAME`),
    turns on the audit view at /audits; `match`, a report of `lmscope match` that includes the atlas's dictionary,
    lists each feature's partners in the other dictionary (linked to `partner_url`/features/ID when given)."""
    store = AtlasStore(atlas)  # raises AtlasError for a missing, unfinished or too-new atlas
    graphs_path = Path(graphs).expanduser() if graphs is not None else None
    if graphs_path is not None and graphs_path.exists() and not graphs_path.is_dir():
        raise LmscopeError(f"--graphs {graphs_path} is a file, not a directory: pass the directory that holds the "
                           "graph JSON files")  # fmt: skip
    diffs_path = Path(diffs).expanduser() if diffs is not None else None
    if diffs_path is not None and diffs_path.exists() and not diffs_path.is_dir():
        raise LmscopeError(f"--diffs {diffs_path} is a file, not a directory: pass the directory that holds the "
                           "report directories (each with a report.json), e.g. the parent of "
                           "`lmscope diff --out`")  # fmt: skip
    app = FastAPI(
        title="lmscope atlas",
        version=__version__,
        description="JSON API of an lmscope feature atlas (schema: docs/atlas.md).",
        openapi_url="/api/openapi.json",
        docs_url=None,  # Swagger UI would load its JS from a CDN; the pages must work offline
        redoc_url=None,
    )
    install(app, store, live, live_note, read_only, graphs_path, diffs_path)
    app.state.audits_dir = Path(audits).expanduser() if audits is not None else None
    app.state.match = match_api.load_match(store, Path(match).expanduser(), partner_url) if match is not None else None
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/vendor/plotly.min.js", include_in_schema=False)
    def plotly_bundle() -> FileResponse:
        p = plotly_js()
        if p is None:
            raise HTTPException(404, "plotly is not installed (pip install plotly); histograms are drawn without it")
        return FileResponse(p, media_type="application/javascript", headers={"Cache-Control": "max-age=86400"})

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon() -> FileResponse:  # the pages link /static/favicon.svg; this is for what asks for the default
        return FileResponse(
            STATIC / "favicon.svg", media_type="image/svg+xml", headers={"Cache-Control": "max-age=86400"}
        )

    app.include_router(api.router)
    app.include_router(labels_api.router)
    app.include_router(steer_api.router)
    app.include_router(graph_api.router)
    app.include_router(graph_api.pages_router)
    app.include_router(diff_api.router)
    app.include_router(diff_api.pages_router)
    app.include_router(audit_api.router)
    app.include_router(audit_api.pages_router)
    app.include_router(match_api.router)
    app.include_router(map_api.router)
    app.include_router(map_api.pages_router)
    app.include_router(pages.router)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> Any:
        # FastAPI's own handler echoes the input, and a non-finite number (1e999) cannot be written as JSON
        errors = _json_safe(jsonable_encoder(exc.errors()))
        if _is_api(request):
            return JSONResponse({"detail": errors}, status_code=422)
        return HTMLResponse(pages.error_page(request, 422, errors), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Any:
        if _is_api(request):
            return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)
        if exc.status_code == 404:
            return HTMLResponse(pages.render("404.html", request, detail=exc.detail), status_code=404)
        return HTMLResponse(pages.error_page(request, exc.status_code, exc.detail), status_code=exc.status_code,
                            headers=exc.headers)  # fmt: skip

    return app
