"""Attribution graphs in the explorer: the JSON API under /api/graphs and the pages /graphs and /graphs/{slug}.

The graphs are the `*.json` files of one directory (`create_app(..., graphs=DIR)`, `lmscope serve ATLAS --graphs
DIR`), in Neuronpedia's attribution-graph schema as `lmscope circuit ... --out DIR/NAME.json` writes them
(lmscope.circuits.export). A graph's slug is its file name without `.json`; a slug is 1-100 letters, digits, '.',
'_' or '-', so a request can name no file outside the directory. The one write, the supernodes of a graph, goes
through `export.set_supernodes` (checked, atomic) and is refused (403) when the explorer is read-only.
"""

from __future__ import annotations

import math
import re
import threading
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Request
from fastapi import Path as PathParam
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, Field

from lmscope.circuits.export import read_neuronpedia, set_supernodes
from lmscope.errors import CircuitError
from lmscope.web.pages import render
from lmscope.web.state import graphs_dir, is_read_only

router = APIRouter(prefix="/api", tags=["graphs"])
pages_router = APIRouter(include_in_schema=False)

SLUG_RE = r"[A-Za-z0-9_.-]{1,100}"
Slug = Annotated[str, PathParam(pattern=f"^{SLUG_RE}$", description="the graph's file name without .json")]
MAX_SUPERNODES = 10_000  # groups in one save

HOW_TO_MAKE = 'lmscope circuit MODEL --transcoders tc/ --prompt "..." --out graphs/NAME.json'
HOW_TO_SERVE = "lmscope serve ATLAS --graphs graphs/"
NO_GRAPHS_NOTE = (
    f"the graph view is off: this explorer was started without a graphs directory; make a graph with `{HOW_TO_MAKE}` "
    f"and restart the explorer with `{HOW_TO_SERVE}`"
)
READ_ONLY_NOTE = "supernode editing is off: this explorer was started with --read-only (restart it without it to edit)"

_write_lock = threading.Lock()  # one supernode save at a time (each reads, changes and rewrites the whole file)
_cache_lock = threading.Lock()
_summaries: dict[Path, tuple[int, int, dict[str, Any]]] = {}  # path -> (mtime_ns, size, summary)


class GraphScores(BaseModel):
    replacement: float | None = None
    completeness: float | None = None


class GraphSummary(BaseModel):
    slug: str = Field(description="the file name without .json: the id of the graph in /api/graphs/{slug}")
    title: str | None = Field(None, description="metadata.slug, the slug the graph was written with")
    prompt: str | None = None
    n_nodes: int = Field(description="nodes in the file (the pruned graph)")
    n_links: int = Field(description="links in the file")
    node_threshold: float | None = None
    n_supernodes: int = 0
    scores: dict[str, GraphScores] | None = Field(
        None, description="metadata.lmscope.scores: replacement and completeness of the unpruned and pruned graph"
    )


class Unreadable(BaseModel):
    file: str
    reason: str


class GraphList(BaseModel):
    directory: str
    exists: bool = Field(description="whether the directory exists (it may not until the first graph is written)")
    graphs: list[GraphSummary]
    unreadable: list[Unreadable] = Field(description="files that are not attribution-graph JSON, with the reason")


class SupernodesBody(BaseModel):
    supernodes: list[Any] = Field(
        max_length=MAX_SUPERNODES, description="the graph's supernodes, each [label, node_id, node_id, ...]"
    )


class SavedSupernodes(BaseModel):
    slug: str
    supernodes: list[list[str]]


def finite_json(obj: Any) -> Any:
    """`obj` with non-finite floats as None: JSON (and the browser's JSON.parse) has no NaN or Infinity."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite_json(v) for v in obj]
    return obj


def check_graph(doc: dict[str, Any], path: Path) -> dict[str, Any]:
    """`doc` if its nodes and links have the shape the graph view draws, else CircuitError saying what is wrong."""
    meta, nodes, links = doc.get("metadata"), doc.get("nodes"), doc.get("links")
    if not isinstance(meta, dict) or not isinstance(doc.get("qParams"), dict):
        raise CircuitError(f"{path.name}: metadata and qParams must be JSON objects")
    if not isinstance(nodes, list) or not all(isinstance(n, dict) and isinstance(n.get("node_id"), str) for n in nodes):
        raise CircuitError(f"{path.name}: nodes must be a list of objects, each with a string node_id")
    if not isinstance(links, list) or not all(isinstance(x, dict) and "source" in x and "target" in x for x in links):
        raise CircuitError(f"{path.name}: links must be a list of objects, each with a source and a target")
    return doc


def load_graph(path: Path) -> dict[str, Any]:
    """A graph file, read and checked (CircuitError with the reason when it cannot be shown)."""
    return check_graph(read_neuronpedia(path), path)


def _number(x: Any) -> float | None:
    return float(x) if isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) else None


def graph_scores(doc: dict[str, Any]) -> dict[str, dict[str, float | None]] | None:
    """metadata.lmscope.scores as {unpruned|pruned: {replacement, completeness}}, or None when the file has none
    (graphs written by other tools)."""
    lm = doc["metadata"].get("lmscope")
    raw = lm.get("scores") if isinstance(lm, dict) else None
    if not isinstance(raw, dict):
        return None
    out = {}
    for which in ("unpruned", "pruned"):
        s = raw.get(which)
        if isinstance(s, dict):
            out[which] = {"replacement": _number(s.get("replacement")), "completeness": _number(s.get("completeness"))}
    return out or None


def summarize(slug: str, doc: dict[str, Any]) -> dict[str, Any]:
    meta = doc["metadata"]
    sn = doc["qParams"].get("supernodes")
    return {
        "slug": slug,
        "title": meta.get("slug") if isinstance(meta.get("slug"), str) else None,
        "prompt": meta.get("prompt") if isinstance(meta.get("prompt"), str) else None,
        "n_nodes": len(doc["nodes"]),
        "n_links": len(doc["links"]),
        "node_threshold": _number(meta.get("node_threshold")),
        "n_supernodes": len(sn) if isinstance(sn, list) else 0,
        "scores": graph_scores(doc),
    }


def _summary(path: Path) -> dict[str, Any]:
    """The summary of one file, cached while its modification time and size stay the same (graph files can be
    tens of MB; the list should not parse them all on every request)."""
    st = path.stat()
    with _cache_lock:
        hit = _summaries.get(path)
    if hit is not None and hit[:2] == (st.st_mtime_ns, st.st_size):
        return hit[2]
    s = summarize(path.stem, load_graph(path))
    with _cache_lock:
        _summaries[path] = (st.st_mtime_ns, st.st_size, s)
    return s


def list_graphs(directory: Path) -> dict[str, Any]:
    """Every graph of `directory`, by slug, and the files that could not be read, with the reason."""
    graphs: list[dict[str, Any]] = []
    unreadable: list[dict[str, str]] = []
    exists = directory.is_dir()
    for p in sorted(directory.glob("*.json")) if exists else []:
        if not p.is_file():
            continue
        if not re.fullmatch(SLUG_RE, p.stem):
            unreadable.append({"file": p.name, "reason": "the file name is not a slug (1-100 letters, digits, '.', "
                               "'_' or '-' before .json); rename it to show it"})  # fmt: skip
            continue
        try:
            graphs.append(_summary(p))
        except (CircuitError, OSError) as exc:
            unreadable.append({"file": p.name, "reason": str(exc)})
    return {"directory": str(directory), "exists": exists, "graphs": graphs, "unreadable": unreadable}


def _directory(request: Request) -> Path:
    d = graphs_dir(request)
    if d is None:
        raise HTTPException(404, NO_GRAPHS_NOTE)
    return d


def graph_path(request: Request, slug: str) -> Path:
    """The file of graph `slug` in the graphs directory; HTTP 404 when there is none (or no graphs directory)."""
    d = _directory(request)
    if not re.fullmatch(SLUG_RE, slug):  # the route checks it too; a slug never names a file outside `d`
        raise HTTPException(422, f"graph slug {slug!r}: use 1-100 letters, digits, '.', '_' or '-'")
    p = d / f"{slug}.json"
    if p.parent != d or not p.is_file():
        raise HTTPException(404, f"no graph {slug!r} in {d}: /graphs lists the graphs there")
    return p


def read_graph(request: Request, slug: str) -> dict[str, Any]:
    p = graph_path(request, slug)
    try:
        return finite_json(load_graph(p))
    except CircuitError as exc:
        raise HTTPException(409, f"graph {slug!r} cannot be shown: {exc}") from None


# --------------------------------------------------------------------------------------------------- JSON API
@router.get("/graphs", response_model=GraphList, responses={404: {"description": "no graphs directory"}})
def get_graphs(request: Request) -> dict[str, Any]:
    """The attribution graphs of the graphs directory (slug, prompt, sizes, scores), and the files there that are
    not readable graphs, with the reason."""
    return finite_json(list_graphs(_directory(request)))


@router.get("/graphs/{slug}", responses={404: {}, 409: {"description": "the file is not a readable graph"}})
def get_graph(request: Request, slug: Slug) -> JSONResponse:
    """One graph: the whole document in Neuronpedia's schema (metadata, qParams, nodes, links)."""
    return JSONResponse(read_graph(request, slug))


@router.post(
    "/graphs/{slug}/supernodes", response_model=SavedSupernodes, responses={403: {}, 404: {}, 409: {}, 422: {}}
)
def post_supernodes(request: Request, slug: Slug, body: SupernodesBody) -> dict[str, Any]:
    """Replace the graph's supernodes (qParams.supernodes, each [label, node_id, ...]) and save the file; returns
    the saved list. An empty list removes them all."""
    if is_read_only(request):
        raise HTTPException(403, READ_ONLY_NOTE)
    p = graph_path(request, slug)
    with _write_lock:
        try:
            doc = set_supernodes(p, body.supernodes)
        except CircuitError as exc:
            raise HTTPException(422, str(exc)) from None
        except OSError as exc:
            raise HTTPException(409, f"the graph file cannot be written ({exc}); serve a writable copy") from None
    return {"slug": slug, "supernodes": doc["qParams"]["supernodes"]}


# ------------------------------------------------------------------------------------------------------ pages
def graph_header(doc: dict[str, Any]) -> dict[str, Any]:
    """What the graph page shows above the graph: prompt, scores, targets, sizes, the pruning slider's range."""
    meta = doc["metadata"]
    lm = meta.get("lmscope") if isinstance(meta.get("lmscope"), dict) else {}
    targets = []
    for t in lm.get("targets") or []:
        if isinstance(t, dict):
            targets.append({"label": str(t.get("label", "")), "probability": _number(t.get("probability"))})
    threshold = _number(meta.get("node_threshold"))
    top = max((inf for n in doc["nodes"] if (inf := _number(n.get("influence"))) is not None
               and n.get("feature_type") not in ("embedding", "logit")), default=None)  # fmt: skip
    hi = threshold if threshold is not None else (top if top is not None else 1.0)
    if top is not None and top > hi:  # the node at the threshold is kept (its cumulative influence can be a little
        hi = math.ceil(top * 1000) / 1000  # above it), and other tools' files may keep more: start showing them all
    lo = min(0.1, hi)
    n_nodes, n_edges = lm.get("n_nodes"), lm.get("n_edges")
    return {
        "prompt": meta.get("prompt") if isinstance(meta.get("prompt"), str) else "",
        "scan": meta.get("scan") if isinstance(meta.get("scan"), str) else None,
        "scores": graph_scores(doc),
        "targets": targets,
        "node_threshold": threshold,
        "edge_threshold": _number(lm.get("edge_threshold")),
        "unpruned": {
            "nodes": n_nodes.get("unpruned") if isinstance(n_nodes, dict) else None,
            "links": n_edges.get("unpruned") if isinstance(n_edges, dict) else None,
        },
        "slider": {"min": lo, "max": hi, "value": hi},
    }


@pages_router.get("/graphs", response_class=HTMLResponse)
def graphs_page(request: Request) -> str:
    d = graphs_dir(request)
    listing = list_graphs(d) if d is not None else None
    return render("graphs.html", request, listing=listing, how_make=HOW_TO_MAKE, how_serve=HOW_TO_SERVE)


@pages_router.get("/graphs/{slug}", response_class=HTMLResponse)
def graph_page(request: Request, slug: Slug) -> str:
    doc = read_graph(request, slug)
    return render("graph.html", request, slug=slug, doc=doc, head=graph_header(doc), read_only=is_read_only(request))
