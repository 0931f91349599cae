"""The atlas explorer: a FastAPI app serving HTML pages and a JSON API (under /api) for one atlas file.

    from lmscope.web.app import create_app
    app = create_app("atlas.db")                       # browse only
    app = create_app("atlas.db", live=Live(model, d))  # plus the live prompt inspector and steering panel
    app = create_app("atlas.db", read_only=True)       # no human-label editing either

The atlas is opened read-only; human labels set from the feature page are written through a separate
short-lived connection that touches only the `labels` table (web/labels_api.py), unless `read_only`.
Nothing is fetched from the internet: the pages use local CSS/JS and the plotly bundle that ships inside the
`plotly` Python package.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from lmscope.atlas.store import AtlasStore
from lmscope.dictionaries.base import Dictionary
from lmscope.errors import LmscopeError
from lmscope.model import Model

STATIC = Path(__file__).parent / "static"
MAX_INSPECT_CHARS = 2000
MAX_FEATURES_PER_TOKEN = 8


@dataclass
class Live:
    """A model and dictionary that the prompt inspector and the steering panel run on demand (one request at a
    time: `lock` guards the model; `steer_lock` turns away a second steering request while one runs)."""

    model: Model
    dictionary: Dictionary
    hook: str | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    steer_lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.hook = self.hook or self.dictionary.cfg.hook
        if not self.hook:
            raise LmscopeError("the dictionary names no hook; pass hook= to Live")
        self.model.resolve(self.hook)
        self.dictionary = self.dictionary.to(self.model.device).float().eval()

    def inspect(self, text: str, top: int = MAX_FEATURES_PER_TOKEN) -> list[dict[str, Any]]:
        """Per token of `text` (BOS first, as in the atlas contexts): the features that fire, strongest first."""
        tok = self.model.tokenizer
        ids = tok(text, add_special_tokens=False)["input_ids"]
        if tok.bos_token_id is not None:
            ids = [tok.bos_token_id, *ids]
        with self.lock, self.model.capture([self.hook]) as acts, torch.inference_mode():
            self.model(torch.tensor([ids]))
            z = self.dictionary.encode(acts[self.hook].float())[0]
        k = min(top, z.shape[-1])
        vals, idx = z.topk(k, dim=-1)
        out = []
        for i, t in enumerate(ids):
            feats = [{"id": int(f), "act": float(v)} for v, f in zip(vals[i].tolist(), idx[i].tolist(), strict=True)
                     if v > 0]  # fmt: skip
            out.append({"token": tok.decode([t]), "token_id": int(t), "features": feats})
        return out


def load_live(
    atlas: str | Path, model: str | None = None, dict_dir: str | Path | None = None, device: str = "auto",
    dtype: str = "auto",
) -> tuple[Live | None, str]:  # fmt: skip
    """Load the atlas's model and dictionary (or the given ones) for the inspector; (None, why) if impossible."""
    from lmscope.dictionaries.formats import load_dictionary
    from lmscope.loading import load_model

    store = AtlasStore(atlas)
    prov = store.provenance
    spec = model or prov.get("model", {}).get("spec")
    path = dict_dir or prov.get("dictionary", {}).get("path")
    if not spec or not path:
        return None, "the atlas does not record where its model or dictionary is; pass --model and --dict"
    try:
        d = load_dictionary(path)
        m = load_model(spec, device=device, dtype=dtype)
        return Live(m, d, hook=prov.get("hook")), f"inspector runs {spec} with {path}"
    except (LmscopeError, OSError) as exc:
        return None, f"the prompt inspector is off: cannot load the model or dictionary ({exc})"


def _json_safe(obj: Any) -> Any:
    """`obj` with non-finite floats written as strings ('inf', 'nan'), which JSON cannot carry."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    return obj


def plotly_js() -> Path | None:
    try:
        import plotly
    except ImportError:
        return None
    p = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
    return p if p.is_file() else None


def create_app(
    atlas: str | Path, live: Live | None = None, live_note: str | None = None, read_only: bool = False
) -> FastAPI:
    """The explorer for `atlas`; `live` enables the prompt inspector and steering; `read_only` turns off the
    routes that write human labels (they answer 403)."""
    from lmscope import __version__
    from lmscope.web import api, labels_api, pages, steer_api

    store = AtlasStore(atlas)  # raises AtlasError for a missing, unfinished or too-new atlas
    app = FastAPI(
        title="lmscope atlas",
        version=__version__,
        description="JSON API of an lmscope feature atlas (schema: docs/atlas.md).",
        openapi_url="/api/openapi.json",
        docs_url=None,  # Swagger UI would load its JS from a CDN; the pages must work offline
        redoc_url=None,
    )
    app.state.store = store
    app.state.live = live
    app.state.live_note = live_note or ("inspector ready" if live else "no model loaded: the prompt inspector is off")
    app.state.read_only = read_only
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/vendor/plotly.min.js", include_in_schema=False)
    def plotly_bundle() -> FileResponse:
        p = plotly_js()
        if p is None:
            raise HTTPException(404, "plotly is not installed (pip install plotly); histograms are drawn without it")
        return FileResponse(p, media_type="application/javascript", headers={"Cache-Control": "max-age=86400"})

    app.include_router(api.router)
    app.include_router(labels_api.router)
    app.include_router(steer_api.router)
    app.include_router(pages.router)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's own handler echoes the input, and a non-finite number (1e999) cannot be written as JSON
        return JSONResponse({"detail": _json_safe(jsonable_encoder(exc.errors()))}, status_code=422)

    @app.exception_handler(404)
    async def not_found(request: Request, exc: Exception) -> Any:
        detail = getattr(exc, "detail", "not found")
        if request.url.path.startswith("/api/"):
            return JSONResponse({"detail": detail}, status_code=404)
        return HTMLResponse(pages.render("404.html", request, detail=detail), status_code=404)

    return app
