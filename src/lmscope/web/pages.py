"""HTML pages of the atlas explorer, rendered on the server with Jinja2 (autoescaped)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from jinja2 import Environment, FileSystemLoader, select_autoescape
from markupsafe import Markup

from lmscope.atlas.family_map import feature_families
from lmscope.atlas.store import AtlasStore, FeatureQuery
from lmscope.explain.labels import MAX_LABEL_CHARS
from lmscope.explain.scorers import SCORER_MEANINGS, score_meaning
from lmscope.web.match_api import match_of
from lmscope.web.state import (
    MAX_FEATURES_PER_TOKEN,
    MAX_INSPECT_CHARS,
    MAX_STEER_CHARS,
    MAX_STEER_TOKENS,
    MAX_STRENGTH,
    OptionalNumber,
    is_read_only,
    live_note,
    live_of,
    search_text,
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


_env.filters.update(tok=show_token, fmt=fmt, pct=pct, tojson_safe=tojson_safe, meaning=score_meaning)
_env.globals["scorer_meanings"] = SCORER_MEANINGS


def render(template: str, request: Request, **ctx: Any) -> str:
    return _env.get_template(template).render(
        request=request, summary=store_of(request).summary, live=live_of(request) is not None,
        live_note=live_note(request), **ctx,
    )  # fmt: skip


def error_page(request: Request, status: int, detail: Any) -> str:
    """A styled page for an error on an HTML page (the JSON API answers JSON): `detail` is a message, or the list
    of validation errors of a request (each said in words, with the value given). It links back to the page
    without the offending query parameters, to the feature list and to the overview."""
    problems: list[dict[str, Any]] = []
    bad_params: list[str] = []
    if isinstance(detail, list):
        for e in detail:
            loc = [str(x) for x in e.get("loc", [])]
            where, name = (loc[0], loc[-1]) if loc else ("", "")
            if where == "query":
                bad_params.append(name)
            given = e.get("input")
            shown = None if isinstance(given, dict | list) or given is None else str(given)
            problems.append({"param": name, "where": where, "msg": e.get("msg", "invalid"), "given": shown})
        message = "Some of this page's parameters are not valid."
    else:
        message = str(detail)
    retry = str(request.url.remove_query_params(bad_params)) if bad_params else None
    return render("error.html", request, status=status, message=message, problems=problems, retry=retry)


# What each metric on the overview means: those of the atlas build (meta.metrics.atlas), then those of an
# evaluation saved next to the dictionary (eval.json, written by `lmscope eval` on its own tokens).
ATLAS_METRICS = {
    "tokens": "text tokens the atlas build scanned (special tokens left out)",
    "contexts": "contexts of the corpus the atlas build ran on",
    "fvu": "fraction of variance unexplained on the atlas build's tokens: Σ‖y − ŷ‖² / Σ‖y − mean y‖²",
    "mse": "mean squared error per token, summed over the d_in dimensions (d_in × the per-element MSE of eval)",
    "l0": "mean number of features that fire per token",
    "dead": "features that never fired on the atlas build's tokens (the “dead” card above)",
    "dead_fraction": "dead features / all features, on the atlas build's tokens",
    "dense": "features that fire on more than 10% of the atlas build's tokens",
}
SAVED_METRICS = {
    "tokens": "tokens the evaluation ran on (not the atlas build's)",
    "fvu": "fraction of variance unexplained on the evaluation's tokens",
    "mse": "mean squared error per element: averaged over tokens and the d_in dimensions (the atlas build's "
    "MSE is per token, d_in times larger)",
    "l0": "mean number of features that fire per token, on the evaluation's tokens",
    "dead_frac": "fraction of features that never fired on the evaluation's tokens (eval, not the atlas build)",
    "dead": "features that never fired on the evaluation's tokens (eval; the atlas build's count is above)",
    "density_hist": "features per log10 firing-frequency bin on the evaluation's tokens",
    "cosine": "mean cosine similarity of the reconstruction and the activation, per token",
    "rel_bias": "E‖ŷ‖² / E[ŷ · y]: 1 is unbiased, below 1 the reconstruction shrinks",
    "ce_clean": "the model's next-token cross-entropy (nats), without the dictionary",
    "ce_spliced": "cross-entropy with the reconstruction spliced in at the hook",
    "ce_spliced_with_error": "cross-entropy with the reconstruction plus its error term (≈ ce_clean)",
    "ce_zero_ablate": "cross-entropy with the hook's activation set to zero",
    "ce_recovered": "(ce_zero_ablate − ce_spliced) / (ce_zero_ablate − ce_clean): 1 is the clean model",
    "kl_spliced": "mean KL(clean ‖ spliced) of the next-token distributions",
    "kl_spliced_with_error": "the same with the error term added back (≈ 0)",
    "hook": "the hook the dictionary reads",
    "hook_out": "the hook a transcoder writes",
}


def _metric_value(v: Any) -> str:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return ", ".join(_metric_value(x) for x in v) if isinstance(v, list) else str(v)
    return f"{v:,}" if isinstance(v, int) else fmt(v, 4)


def metric_rows(metrics: dict[str, Any], notes: dict[str, str], source: str) -> list[tuple[str, str, str]]:
    """(name, value, what it means) for each metric; a saved density histogram gives its dead count its own row."""
    rows = []
    for k, v in metrics.items():
        if isinstance(v, dict):
            if "dead" in v:
                rows.append(("dead", _metric_value(v["dead"]), notes.get("dead", f"from {source}")))
            if "counts" in v:
                rows.append((k, _metric_value(v["counts"]), notes.get(k, f"from {source}")))
            continue
        rows.append((k, _metric_value(v), notes.get(k, f"as recorded in {source}")))
    return rows


def headline_cards(ov: dict[str, Any]) -> list[dict[str, Any]]:
    """The overview's cards, most telling first: CE recovered (from a saved evaluation, when one was found beside
    the dictionary), then the atlas build's FVU, L0, dead and dense counts; each with one line on what it means."""
    atlas = ov["metrics"].get("atlas") or {}
    saved = [m for m in (ov["metrics"].get("saved") or {}).values() if isinstance(m, dict)]
    ce = next((m["ce_recovered"] for m in saved if isinstance(m.get("ce_recovered"), int | float)), None)
    cards: list[dict[str, Any]] = []
    if ce is not None:
        note = ("how much of the model's next-token loss survives with the dictionary's reconstruction in place of "
                "the activation: 1 is the clean model, 0 as bad as zeroing it (saved eval)")
        cards.append({"id": "card-ce", "k": "CE recovered", "v": fmt(ce, 3), "note": note})
    cards += [
        {"id": "card-fvu", "k": "FVU", "v": fmt(atlas.get("fvu")) if "fvu" in atlas else "–",
         "note": "variance of the activation the reconstruction misses: 0 is perfect, 1 no better than the mean"},
        {"id": "card-l0", "k": "L0", "v": fmt(atlas.get("l0")) if "l0" in atlas else "–",
         "note": "features firing per token on average: the sparsity"},
        {"id": "n-dead", "k": "dead", "v": str(ov["dead"]),
         "note": "features that never fired on the atlas's tokens"},
        {"id": "card-dense", "k": "dense (>10%)", "v": str(atlas.get("dense", "–")),
         "note": "features firing on more than 10% of tokens: often too broad to mean one thing"},
        {"id": "n-features", "k": "features", "v": str(ov["features"]), "note": "the dictionary's width"},
        {"id": "card-tokens", "k": "tokens scanned", "v": f"{ov['summary']['tokens']:,}",
         "note": "text tokens the atlas was built on (special tokens left out)"},
    ]  # fmt: skip
    return cards


def overview_context(store: AtlasStore) -> dict[str, Any]:
    """What the overview page shows (also rendered by the static export)."""
    ov = store.overview()
    saved = {name: metric_rows(m, SAVED_METRICS, name) for name, m in (ov["metrics"].get("saved") or {}).items()
             if isinstance(m, dict)}  # fmt: skip
    return {"ov": ov, "atlas_metrics": metric_rows(ov["metrics"].get("atlas") or {}, ATLAS_METRICS, "the atlas build"),
            "saved_metrics": saved, "cards": headline_cards(ov)}  # fmt: skip


@router.get("/", response_class=HTMLResponse)
def overview_page(request: Request) -> str:
    return render("overview.html", request, **overview_context(store_of(request)))


@router.get("/features", response_class=HTMLResponse, response_model=None)
def features_page(
    request: Request,
    q: str = Query("", max_length=200),
    by: Literal["label", "text", "token"] = "text",
    sort: Literal["id", "density", "max_act", "mean_act", "relevance", "relative_norm", ""] = "",
    band: Literal["other-only", "base-only", "shared", "in between", "dead", ""] = "",
    order: Literal["asc", "desc"] = "desc",
    min_density: Annotated[OptionalNumber, Query()] = None,
    max_density: Annotated[OptionalNumber, Query()] = None,
    min_act: Annotated[OptionalNumber, Query()] = None,
    dead: bool = False,
    page: int = Query(1, ge=1, le=100_000),
) -> str | Response:
    per = 50
    store = store_of(request)
    text = search_text(q)  # None when blank: no query
    goto = store.feature_id(text)
    if goto is not None and text is not None and text.strip().startswith("#"):
        return RedirectResponse(f"/features/{goto}", status_code=303)
    sort_ = sort or ("relevance" if text else "density")
    fq = FeatureQuery(
        sort=sort_, order=order, min_density=min_density, max_density=max_density, min_act=min_act, dead=dead,
        q=text, by=by, band=band or None, limit=per, offset=(page - 1) * per,
    )  # fmt: skip
    res = store.list_features(fq)
    params = {"q": text or "", "by": by, "sort": sort_, "order": order, "dead": dead, "min_density": min_density,
              "max_density": max_density, "min_act": min_act, "band": band}  # fmt: skip
    return render("features.html", request, res=res, p=params, page=page, pages=max(1, -(-res["total"] // per)),
                  goto=goto, crosscoder=store.is_crosscoder)  # fmt: skip


@router.get("/features/{fid}", response_class=HTMLResponse)
def feature_page(request: Request, fid: int) -> str:
    store = store_of(request)
    data = store.feature(fid) if 0 <= fid < store.n_features else None
    if data is None:
        raise HTTPException(404, f"feature {fid} does not exist; ids run from 0 to {store.n_features - 1}")
    view = match_of(request)
    return render("feature.html", request, **feature_context(store, data, is_read_only(request)),
                  partners=view.partners(fid) if view is not None else None)  # fmt: skip


def feature_context(store: AtlasStore, data: dict[str, Any], read_only: bool) -> dict[str, Any]:
    """What a feature page shows, given `store.feature(id)` (also rendered by the static export)."""
    return {
        "f": data, "n_features": store.n_features, "max_label": MAX_LABEL_CHARS, "read_only": read_only,
        "max_inspect": MAX_INSPECT_CHARS,
        "steer": {"max_chars": MAX_STEER_CHARS, "max_tokens": MAX_STEER_TOKENS, "max_strength": MAX_STRENGTH},
        "families": feature_families(store.conn, data["id"]),  # None: the atlas has no map (lmscope families)
    }  # fmt: skip


@router.get("/inspect", response_class=HTMLResponse)
def inspect_page(
    request: Request,
    text: Annotated[str, Query(description="a prompt to inspect on load (a shared view)")] = "",
    feature: Annotated[OptionalNumber, Query(description="colour by this feature alone")] = None,
) -> str:
    """The prompt inspector; `?text=...&feature=N` opens a shared view (the page writes them into its URL)."""
    store = store_of(request)
    fid = None
    if feature is not None:
        if not math.isfinite(feature) or feature != int(feature) or not 0 <= feature < store.n_features:
            raise HTTPException(404, f"feature {feature:g} does not exist; ids run from 0 to {store.n_features - 1}")
        fid = int(feature)
    return render("inspect.html", request, max_chars=MAX_INSPECT_CHARS, per_token=MAX_FEATURES_PER_TOKEN, text=text,
                  feature=fid)  # fmt: skip
