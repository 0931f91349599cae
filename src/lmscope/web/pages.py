"""HTML pages of the atlas explorer, rendered on the server with Jinja2 (autoescaped)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import HTMLResponse
from jinja2 import Environment, FileSystemLoader, select_autoescape
from markupsafe import Markup

from lmscope.atlas.store import FeatureQuery
from lmscope.explain.labels import MAX_LABEL_CHARS
from lmscope.web.state import (
    MAX_INSPECT_CHARS,
    MAX_STEER_CHARS,
    MAX_STEER_TOKENS,
    is_read_only,
    live_note,
    live_of,
    store_of,
)

router = APIRouter(include_in_schema=False)
TEMPLATES = Path(__file__).parent / "templates"
_env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=select_autoescape(["html"]))


def show_token(t: str) -> str:
    """Make whitespace in a token visible: newlines as ↵, tabs as →."""
    return t.replace("\n", "↵").replace("\t", "→")


def fmt(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "–"
    if x == 0:
        return "0"
    return f"{x:.{digits}g}" if abs(x) >= 1e-3 else f"{x:.{digits - 1}e}"


def pct(x: float) -> str:
    return f"{100 * x:.3g}%" if x else "0%"


def tojson_safe(obj: Any) -> Markup:
    """JSON for a <script type="application/json"> block; `<` is escaped so no tag can close the block."""
    return Markup(json.dumps(obj).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026"))


_env.filters.update(tok=show_token, fmt=fmt, pct=pct, tojson_safe=tojson_safe)


def render(template: str, request: Request, **ctx: Any) -> str:
    return _env.get_template(template).render(
        request=request, summary=store_of(request).summary, live=live_of(request) is not None,
        live_note=live_note(request), **ctx,
    )  # fmt: skip


@router.get("/", response_class=HTMLResponse)
def overview_page(request: Request) -> str:
    return render("overview.html", request, ov=store_of(request).overview())


@router.get("/features", response_class=HTMLResponse)
def features_page(
    request: Request,
    q: str = Query("", max_length=200),
    by: Literal["label", "text", "token"] = "text",
    sort: Literal["id", "density", "max_act", "mean_act", "relevance", ""] = "",
    order: Literal["asc", "desc"] = "desc",
    min_density: float | None = None,
    max_density: float | None = None,
    min_act: float | None = None,
    dead: bool = False,
    page: int = Query(1, ge=1, le=100_000),
) -> str:
    per = 50
    sort_ = sort or ("relevance" if q.strip() else "density")
    fq = FeatureQuery(
        sort=sort_, order=order, min_density=min_density, max_density=max_density, min_act=min_act, dead=dead,
        q=q or None, by=by, limit=per, offset=(page - 1) * per,
    )  # fmt: skip
    res = store_of(request).list_features(fq)
    params = {"q": q, "by": by, "sort": sort_, "order": order, "dead": dead, "min_density": min_density,
              "max_density": max_density, "min_act": min_act}  # fmt: skip
    return render("features.html", request, res=res, p=params, page=page, pages=max(1, -(-res["total"] // per)))


@router.get("/features/{fid}", response_class=HTMLResponse)
def feature_page(request: Request, fid: int) -> str:
    store = store_of(request)
    data = store.feature(fid)
    if data is None:
        raise HTTPException(404, f"feature {fid} does not exist; ids run from 0 to {store.n_features - 1}")
    return render(
        "feature.html", request, f=data, n_features=store.n_features, max_label=MAX_LABEL_CHARS,
        read_only=is_read_only(request), steer={"max_chars": MAX_STEER_CHARS, "max_tokens": MAX_STEER_TOKENS},
    )  # fmt: skip


@router.get("/inspect", response_class=HTMLResponse)
def inspect_page(request: Request) -> str:
    return render("inspect.html", request, max_chars=MAX_INSPECT_CHARS)
