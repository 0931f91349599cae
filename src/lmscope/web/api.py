"""JSON API of the atlas explorer (documented by the OpenAPI schema at /api/openapi.json)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Query, Request
from pydantic import BaseModel, Field

from lmscope.atlas.store import FeatureQuery
from lmscope.web.state import (
    MAX_FEATURES_PER_TOKEN,
    MAX_INSPECT_CHARS,
    OptionalNumber,
    live_note,
    live_of,
    search_text,
    store_of,
)

router = APIRouter(prefix="/api", tags=["atlas"])


class Label(BaseModel):
    text: str
    source: Literal["human", "machine"]
    score: float | None = Field(None, description="the label's latest score")
    explainer: str | None = Field(None, description="what wrote it: an explainer, or a human label's author")
    scorer: str | None = Field(None, description="the scorer that gave `score`")


class FeatureSummary(BaseModel):
    id: int
    density: float = Field(description="fraction of (non-special) tokens where the feature fires")
    n_fired: int
    mean_act: float = Field(description="mean activation over the tokens where it fires")
    max_act: float
    dead: bool
    label: Label | None = None
    relative_norm: float | None = Field(
        None, description="a crosscoder's atlas: relative decoder norm (0 BASE-only, 0.5 shared, 1 OTHER-only)"
    )


class FeatureList(BaseModel):
    total: int = Field(description="features matching the filters (all pages)")
    limit: int
    offset: int
    items: list[FeatureSummary]


class Snippet(BaseModel):
    pre: str = Field(description="text before the match (an ellipsis first when cut)")
    hit: str = Field(description="the matching text, as it is in the example")
    post: str = Field(description="text after the match (an ellipsis last when cut)")


class SearchItem(FeatureSummary):
    snippet: Snippet | None = Field(
        None, description="where a top example matches (by text: the text; by token: the peak token)"
    )


class SearchResult(BaseModel):
    total: int = Field(description="features matching the search (all pages)")
    limit: int
    offset: int
    items: list[SearchItem]
    query: str
    by: Literal["label", "text", "token"]
    feature: int | None = Field(None, description='the feature whose id the query is ("787" or "#787"), if any')


class Example(BaseModel):
    context: int = Field(description="context id in the atlas")
    pos: int = Field(description="position of the example token in its context")
    start: int = Field(description="context position of the first token of the window")
    peak: int = Field(description="index of the example token within `tokens`")
    act: float
    tokens: list[str]
    token_ids: list[int]
    acts: list[float] = Field(description="the feature's activation on each token of the window")
    special: list[bool] = Field(
        default_factory=list, description="whether each token is a special token (BOS/EOS/pad): left out of the "
        "feature's statistics, and of colour scales",
    )  # fmt: skip
    text: str
    before: list[str] = Field(default_factory=list, description="the context's tokens before the window")
    after: list[str] = Field(default_factory=list, description="the context's tokens after the window (the "
                             "atlas records activations for the window only)")  # fmt: skip


class QuantileBin(BaseModel):
    bin: int
    lo: float
    hi: float
    count: int = Field(description="firings in [lo, hi) over the whole build")
    examples: list[Example] = Field(description="a uniform sample of those firings")


class Histogram(BaseModel):
    edges: list[float]
    counts: list[int]


class TokenEffect(BaseModel):
    token_id: int
    token: str
    value: float


class LogitEffects(BaseModel):
    positive: list[TokenEffect]
    negative: list[TokenEffect]


class Neighbour(BaseModel):
    id: int
    cosine: float
    label: Label | None = None


class Cofire(BaseModel):
    id: int
    count: int = Field(description="sampled tokens where both fire")
    fraction: float = Field(description="P(other fires | this fires) on the sample")
    label: Label | None = None


class LabelScore(BaseModel):
    scorer: str
    score: float | None = None
    n: int | None = Field(None, description="examples the score was computed on, if known")
    created: str


class LabelFull(BaseModel):
    id: int
    text: str
    source: str
    explainer: str | None = None
    score: float | None = Field(None, description="the latest score (as in v1 atlases)")
    scorer: str | None = None
    created: str
    scores: list[LabelScore] = Field(default_factory=list, description="every scorer's score of this label")


class CrosscoderLatent(BaseModel):
    relative_norm: float | None = Field(description="0 BASE-only, 0.5 shared, 1 OTHER-only (None: both halves zero)")
    band: str
    nu_error: float | None = Field(None, description="Latent Scaling: share of BASE's error the latent explains")
    nu_recon: float | None = Field(None, description="Latent Scaling: share of BASE's reconstruction it explains")
    robust: bool | None = Field(None, description="an OTHER-only latent that survives Latent Scaling")


class Feature(FeatureSummary):
    labels: list[LabelFull]
    histogram: Histogram
    top_examples: list[Example]
    quantiles: list[QuantileBin]
    logit_effects: LogitEffects | None
    logit_note: str | None
    neighbours: list[Neighbour]
    cofire: list[Cofire]
    crosscoder: CrosscoderLatent | None = Field(None, description="a crosscoder's atlas: how the latent differs")


class DensityHistogram(BaseModel):
    log10_edges: list[float]
    counts: list[int]


class Overview(BaseModel):
    schema_version: int
    features: int
    dead: int
    crosscoder_bands: dict[str, int] | None = None
    summary: dict[str, Any]
    metrics: dict[str, Any]
    density_histogram: DensityHistogram
    provenance: dict[str, Any]


class InspectRequest(BaseModel):
    text: str = Field(description="the prompt; at most 2000 characters")
    feature: int | None = Field(None, description="also this feature's activation at every token (`focus`)")


class InspectFeature(BaseModel):
    id: int
    act: float
    label: Label | None = None


class InspectToken(BaseModel):
    token: str
    token_id: int
    special: bool = Field(False, description="a special token (BOS/EOS/pad), which the atlas leaves out of its "
                          "statistics")  # fmt: skip
    n_active: int = Field(0, description=f"features that fire on the token; `features` shows the strongest "
                          f"{MAX_FEATURES_PER_TOKEN}")  # fmt: skip
    features: list[InspectFeature]
    focus: float | None = Field(None, description="the requested feature's activation on this token")


class InspectResponse(BaseModel):
    model: str
    hook: str
    tokens: list[InspectToken]
    feature: int | None = Field(None, description="the feature asked for, if any")
    feature_max_act: float | None = Field(None, description="its max activation over the atlas's tokens")
    feature_label: Label | None = None


SortParam = Literal["id", "density", "max_act", "mean_act", "relevance", "relative_norm"]
BandParam = Literal["other-only", "base-only", "shared", "in between", "dead"]


@router.get("/overview", response_model=Overview)
def overview(request: Request) -> dict[str, Any]:
    """Dictionary metrics, the density histogram (log10 bins), the dead count and the build's provenance."""
    return store_of(request).overview()


@router.get("/features", response_model=FeatureList)
def list_features(
    request: Request,
    sort: SortParam | None = Query(None, description="default: relevance when q is given, else id"),
    order: Literal["asc", "desc"] = "asc",
    min_density: Annotated[OptionalNumber, Query(description="minimum density (empty: not set)")] = None,
    max_density: Annotated[OptionalNumber, Query(description="maximum density (empty: not set)")] = None,
    min_act: Annotated[OptionalNumber, Query(description="minimum max activation (empty: not set)")] = None,
    max_act: Annotated[OptionalNumber, Query(description="maximum max activation (empty: not set)")] = None,
    dead: bool = Query(True, description="include dead features"),
    q: str | None = Query(None, max_length=200, description="search text (see `by`); blank: no search"),
    by: Literal["label", "text", "token"] = "text",
    band: BandParam | None = Query(None, description="a crosscoder's atlas: only latents of this band"),
    limit: int = Query(50, ge=1, le=500),
    offset: int = Query(0, ge=0),
) -> dict[str, Any]:
    """Features, filtered, sorted and paged; with `q`, only those matching the search."""
    q = search_text(q)
    fq = FeatureQuery(
        sort=sort or ("relevance" if q else "id"), order=order, min_density=min_density, max_density=max_density,
        min_act=min_act, max_act=max_act, dead=dead, q=q, by=by, band=band, limit=limit, offset=offset,
    )  # fmt: skip
    return store_of(request).list_features(fq)


@router.get("/search", response_model=SearchResult)
def search(
    request: Request,
    q: str = Query(..., min_length=1, max_length=200),
    by: Literal["label", "text", "token"] = Query("text", description="label, example text, or example token"),
    limit: int = Query(50, ge=1, le=500),
    offset: int = Query(0, ge=0),
) -> dict[str, Any]:
    """Features whose labels contain `q` (a phrase of words), whose top-example text contains `q` (any text,
    punctuation included, case-insensitive), or whose top examples peak on the token `q`; most relevant first,
    each with a snippet of where it matched. A query that is a feature id also names that feature (`feature`).
    A blank query is refused (422)."""
    text = search_text(q, required=True)
    store = store_of(request)
    res = store.list_features(FeatureQuery(sort="relevance", q=text, by=by, limit=limit, offset=offset))
    return {**res, "query": q, "by": by, "feature": store.feature_id(q)}


@router.get("/features/{fid}", response_model=Feature, responses={404: {"description": "no such feature"}})
def feature(request: Request, fid: int) -> dict[str, Any]:
    """Everything the atlas knows about one feature."""
    store = store_of(request)
    data = store.feature(fid) if 0 <= fid < store.n_features else None
    if data is None:
        raise HTTPException(404, f"feature {fid} does not exist; ids run from 0 to {store_of(request).n_features - 1}")
    return data


@router.post(
    "/inspect",
    response_model=InspectResponse,
    responses={413: {"description": "text too long"}, 503: {"description": "no model loaded"}},
)
def inspect(request: Request, body: InspectRequest) -> dict[str, Any]:
    """Run the model and dictionary on `text`; per token, the features that fire (strongest first)."""
    live = live_of(request)
    if live is None:
        raise HTTPException(503, f"the prompt inspector is not available: {live_note(request)}")
    if len(body.text) > MAX_INSPECT_CHARS:
        raise HTTPException(
            413, f"the text is {len(body.text):,} characters; the inspector accepts at most {MAX_INSPECT_CHARS:,}"
        )
    if not body.text.strip():
        raise HTTPException(422, "the text is empty; type a prompt to inspect")
    store = store_of(request)
    fid = body.feature
    n = min(store.n_features, live.dictionary.cfg.d_sae)
    if fid is not None and not 0 <= fid < n:
        raise HTTPException(404, f"feature {fid} does not exist; ids run from 0 to {n - 1}")
    tokens = live.inspect(body.text, feature=fid)
    labels = store.labels(sorted({f["id"] for t in tokens for f in t["features"]}))
    for t in tokens:
        for f in t["features"]:
            f["label"] = labels.get(f["id"])
    out: dict[str, Any] = {"model": live.model.spec, "hook": live.hook, "tokens": tokens}
    if fid is not None:
        mx = store.max_acts([fid]).get(fid)
        out |= {"feature": fid, "feature_max_act": mx, "feature_label": store.labels([fid]).get(fid)}
    return out
