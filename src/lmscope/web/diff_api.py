"""Model-diff reports in the explorer: the JSON API under /api/diffs and the pages /diffs and /diffs/{name}.

The reports are the subdirectories of one directory (`create_app(..., diffs=DIR)`, `lmscope serve ATLAS --diffs
DIR`) that hold a `report.json`, as `lmscope diff BASE OTHER --out DIR/NAME` writes them (lmscope.diff). A report's
name is its subdirectory's name: 1-100 letters, digits, '.', '_' or '-', not starting with '.', so a request can
name nothing outside the directory ('..', '.' and anything with a path separator answer 404). The report page is
the report's own HTML (`lmscope.diff.html.render`) with a search form above it (`lmscope.diff.search`). Nothing here
writes.
"""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse
from jinja2 import Environment, FileSystemLoader, Template, TemplateError
from pydantic import BaseModel, ConfigDict, Field

from lmscope.diff import search
from lmscope.diff.html import render as render_report
from lmscope.errors import DiffError
from lmscope.web.graph_api import finite_json
from lmscope.web.pages import TEMPLATES
from lmscope.web.state import diffs_dir, live_note, live_of, search_text, store_of

router = APIRouter(prefix="/api", tags=["diffs"])
pages_router = APIRouter(include_in_schema=False)

NAME_RE = r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,99}"
REPORT = "report.json"
MAX_QUERY_CHARS = 200  # characters of a search string

HOW_TO_MAKE = "lmscope diff BASE OTHER --out diffs/NAME"
HOW_TO_SERVE = "lmscope serve ATLAS --diffs DIR"
NO_DIFFS_NOTE = (
    f"the diff view is off: this explorer was started without a diffs directory; write a report with "
    f"`{HOW_TO_MAKE}` and restart the explorer with `{HOW_TO_SERVE}` (DIR: the directory that holds the reports, "
    f"e.g. diffs/)"
)

_cache_lock = threading.Lock()
_summaries: dict[Path, tuple[int, int, dict[str, Any]]] = {}  # report.json -> (mtime_ns, size, summary)

# autoescape on for every template, the ones made from the strings below included
_env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=True)

LIST_PAGE = """{% extends "base.html" %}
{% block title %}Model diffs{% endblock %}
{% block body %}
<h1>Model diffs</h1>
<p class="muted" id="diffs-dir">Reports in <code>{{ listing.directory }}</code>
{%- if not listing.exists %} (the directory does not exist yet){% endif %}.</p>
{% if listing.diffs %}
<table class="list" id="diff-table">
  <thead><tr><th>report</th><th>base</th><th>other</th><th>ground truth</th></tr></thead>
  <tbody>
  {% for d in listing.diffs %}
  <tr data-name="{{ d.name }}">
    <td><a href="/diffs/{{ d.name|urlencode }}">{{ d.name }}</a></td>
    <td><code>{{ d.base or "–" }}</code></td>
    <td><code>{{ d.other or "–" }}</code></td>
    <td>{{ d.ground_truth or "–" }}</td>
  </tr>
  {% endfor %}
  </tbody>
</table>
{% else %}
<div class="warn" id="diffs-none">
  <p>There are no diff reports here yet.</p>
  <p>Write one with <code>{{ how_make }}</code> (into this directory), then reload this page; or restart the
  explorer on another directory with <code>{{ how_serve }}</code>.</p>
</div>
{% endif %}
{% if listing.unreadable %}
<h2>Directories that are not readable reports</h2>
<ul id="diffs-unreadable">
{% for u in listing.unreadable %}<li><code>{{ u.name }}</code>: {{ u.reason }}</li>{% endfor %}
</ul>
{% endif %}
{% endblock %}
"""

# Put at the top of the report's own page (which has its own styles: this block styles itself).
SEARCH_BLOCK = """<div id="diff-search"
 style="border:1px solid #ddd;border-radius:6px;padding:.5em .9em;margin:0 0 1em;background:#fafafa">
<p style="margin:.2em 0"><a href="/diffs">all diffs</a> · <a href="/">atlas overview</a> ·
 <a href="/api/diffs/{{ name|urlencode }}">report JSON</a></p>
<form method="get" action="/diffs/{{ name|urlencode }}" id="diff-search-form" style="margin:.3em 0">
  <label>search the evidence <input type="search" name="q" value="{{ q or "" }}" maxlength="{{ max_q }}"
   placeholder="a string, e.g. a trigger" id="diff-q"></label>
  <button type="submit">search</button>
</form>
{% if q is not none %}
<p id="diff-hit-count">{{ hits|length }} hit(s) for <code>{{ q }}</code></p>
{% if hits %}
<table id="diff-hits">
  <thead><tr><th>where</th><th>rank</th><th>latent</th><th>label</th><th>examples</th><th>robust</th></tr></thead>
  <tbody>
  {% for h in hits %}
  <tr><td>{{ h.where }}</td><td>{{ h.rank }}</td><td>{{ h.latent }}</td><td>{{ h.label }}</td>
   <td>{{ h.examples }}</td><td>{{ h.robust }}</td></tr>
  {% endfor %}
  </tbody>
</table>
{% endif %}
{% endif %}
</div>
"""
_LIST, _SEARCH = _env.from_string(LIST_PAGE), _env.from_string(SEARCH_BLOCK)


class DiffSummary(BaseModel):
    name: str = Field(description="the report's directory name: the id of the report in /api/diffs/{name}")
    base: str | None = Field(None, description="the BASE model the report compares against")
    other: str | None = Field(None, description="the OTHER model (the fine-tune)")
    format: str | None = Field(None, description="the report's format tag (lmscope-diff/N)")
    ground_truth: str | None = Field(None, description="ground_truth_check.kind, for a diff of a planted organism")


class UnreadableDiff(BaseModel):
    name: str
    reason: str


class DiffList(BaseModel):
    directory: str
    exists: bool = Field(description="whether the directory exists (it may not until the first report is written)")
    diffs: list[DiffSummary]
    unreadable: list[UnreadableDiff] = Field(description="directories whose report.json cannot be read, with why")


class DiffHit(BaseModel):
    model_config = ConfigDict(extra="allow")

    where: str = Field(description="the part of the report holding the text (crosscoder run, direction, layer ...)")
    rank: int | None = None
    latent: int | None = None
    examples: int | None = Field(None, description="examples that hold the text")
    of: int | None = Field(None, description="examples shown there")
    robust: bool | None = None
    label: str | None = None


def is_name(name: str) -> bool:
    """Whether `name` can be a report's directory name (never '.', '..', or anything with a path separator)."""
    return re.fullmatch(NAME_RE, name) is not None


def _damaged(path: Path, why: str) -> str:
    return f"{path} is not a readable diff report ({why}); rerun `lmscope diff ... --out {path.parent}` to rewrite it"


def load_report(path: Path) -> dict[str, Any]:
    """A report.json, parsed; DiffError naming the file and saying how to mend it when it is damaged."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DiffError(_damaged(path, f"invalid JSON: {exc}")) from None
    except UnicodeDecodeError:
        raise DiffError(_damaged(path, "not UTF-8 text")) from None
    except OSError as exc:
        raise DiffError(_damaged(path, f"cannot be read: {exc.strerror or exc}")) from None
    if not isinstance(doc, dict):
        raise DiffError(_damaged(path, f"a JSON {type(doc).__name__}, not an object"))
    return doc


def _text(x: Any) -> str | None:
    return x if isinstance(x, str) else None


def summarize(name: str, doc: dict[str, Any]) -> dict[str, Any]:
    gt = doc.get("ground_truth_check")
    return {
        "name": name,
        "base": _text(doc.get("base")),
        "other": _text(doc.get("other")),
        "format": _text(doc.get("format")),
        "ground_truth": _text(gt.get("kind")) if isinstance(gt, dict) else None,
    }


def _summary(name: str, path: Path) -> dict[str, Any]:
    """The summary of one report, cached while its modification time and size stay the same (a report can be
    several MB; the list should not parse them all on every request)."""
    st = path.stat()
    with _cache_lock:
        hit = _summaries.get(path)
    if hit is not None and hit[:2] == (st.st_mtime_ns, st.st_size):
        return hit[2]
    s = summarize(name, load_report(path))
    with _cache_lock:
        _summaries[path] = (st.st_mtime_ns, st.st_size, s)
    return s


def list_diffs(directory: Path) -> dict[str, Any]:
    """Every report directly under `directory` (a subdirectory holding report.json), by name, and the ones that
    cannot be read, with the reason."""
    diffs: list[dict[str, Any]] = []
    unreadable: list[dict[str, str]] = []
    exists = directory.is_dir()
    for sub in sorted(directory.iterdir()) if exists else []:
        report = sub / REPORT
        if not sub.is_dir() or not report.is_file():
            continue
        if not is_name(sub.name):
            if not sub.name.startswith("."):  # hidden directories are left out silently
                unreadable.append({"name": sub.name, "reason": "the directory name is not a report name (1-100 "
                                   "letters, digits, '.', '_' or '-'); rename it to show it"})  # fmt: skip
            continue
        try:
            diffs.append(_summary(sub.name, report))
        except (DiffError, OSError) as exc:
            unreadable.append({"name": sub.name, "reason": str(exc)})
    return {"directory": str(directory), "exists": exists, "diffs": diffs, "unreadable": unreadable}


def _directory(request: Request) -> Path:
    d = diffs_dir(request)
    if d is None:
        raise HTTPException(404, NO_DIFFS_NOTE)
    return d


def report_path(request: Request, name: str) -> Path:
    """The report.json of report `name` in the diffs directory; HTTP 404 when there is none (or no diffs
    directory, or a name that could point outside it)."""
    d = _directory(request)
    if not is_name(name):
        raise HTTPException(404, f"no diff report {name!r}: a report name is the name of a directory in {d} "
                            "(letters, digits, '.', '_' or '-'; no path separator, no '..'); /diffs lists the "
                            "reports")  # fmt: skip
    p = d / name / REPORT
    if p.parent.parent != d or not p.is_file():
        raise HTTPException(404, f"no diff report {name!r} in {d} (no {name}/{REPORT} there): /diffs lists the "
                            "reports")  # fmt: skip
    return p


def read_report(request: Request, name: str) -> dict[str, Any]:
    """Report `name`, parsed; HTTP 409 naming the file when it is damaged."""
    p = report_path(request, name)
    try:
        return load_report(p)
    except DiffError as exc:
        raise HTTPException(409, str(exc)) from None


def _unshowable(p: str, name: str, exc: Exception) -> HTTPException:
    return HTTPException(409, f"diff report {name!r} cannot be {p} ({type(exc).__name__}: {exc}); its report.json "
                         f"is missing parts: rerun `lmscope diff ... --out DIR/{name}` to write it again")  # fmt: skip


def _cell(x: Any) -> str:
    return "" if x is None else str(x)


def hit_rows(hits: list[dict[str, Any]]) -> list[dict[str, str]]:
    """The search hits as the page's table shows them, one string per column ('' where a hit has no value)."""
    rows = []
    for h in hits:
        examples = _cell(h.get("examples"))
        if examples and h.get("of") is not None:
            examples += f" of {h['of']}"
        elif not examples and h.get("kl") is not None:
            examples = f"KL {h['kl']:.3g}" if isinstance(h["kl"], float) else f"KL {h['kl']}"
        robust = h.get("robust")
        rows.append({"where": _cell(h.get("where")), "rank": _cell(h.get("rank")), "latent": _cell(h.get("latent")),
                     "label": _cell(h.get("label")), "examples": examples,
                     "robust": "" if robust is None else ("yes" if robust else "no")})  # fmt: skip
    return rows


def search_report(name: str, doc: dict[str, Any], q: str) -> list[dict[str, Any]]:
    """`lmscope.diff.search` over one report: HTTP 422 for a string it refuses, 409 for a report it cannot read."""
    try:
        hits = search(doc, q)
    except DiffError as exc:
        raise HTTPException(422, str(exc)) from None
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        raise _unshowable("searched", name, exc) from None
    out: list[dict[str, Any]] = finite_json(hits)
    return out


# --------------------------------------------------------------------------------------------------- JSON API
@router.get("/diffs", response_model=DiffList, responses={404: {"description": "no diffs directory"}})
def get_diffs(request: Request) -> dict[str, Any]:
    """The model-diff reports of the diffs directory (name, base and other model, ground-truth kind), and the
    directories there whose report.json cannot be read, with the reason."""
    return finite_json(list_diffs(_directory(request)))


@router.get("/diffs/{name}", responses={404: {}, 409: {"description": "report.json is damaged"}})
def get_diff(request: Request, name: str) -> JSONResponse:
    """One report: the whole report.json (non-finite numbers as null)."""
    return JSONResponse(finite_json(read_report(request, name)))


@router.get(
    "/diffs/{name}/search",
    responses={200: {"model": list[DiffHit]}, 404: {}, 409: {}, 422: {"description": "a blank search text"}},
)
def get_diff_search(
    request: Request, name: str,
    q: Annotated[str | None, Query(max_length=MAX_QUERY_CHARS, description="the text to find")] = None,
) -> JSONResponse:  # fmt: skip
    """Every latent, direction, layer and context of the report whose evidence holds `q` (`lmscope diff-search`),
    as a list of hits, each with at least `where`."""
    report_path(request, name)  # 404 first for a name that is no report
    text = search_text(q, required=True)
    assert text is not None  # required: a blank one raised 422
    return JSONResponse(search_report(name, read_report(request, name), text))


# ------------------------------------------------------------------------------------------------------ pages
def _page(template: Template, request: Request, **ctx: Any) -> str:
    """A page in the explorer's frame (base.html), from one of the templates above."""
    return template.render(
        request=request, summary=store_of(request).summary, live=live_of(request) is not None,
        live_note=live_note(request), **ctx,
    )  # fmt: skip


def _with_search(report_html: str, block: str) -> str:
    """The report's page with `block` put first in its body."""
    m = re.search(r"<body[^>]*>", report_html, re.IGNORECASE)
    if m is None:
        return block + report_html
    return report_html[: m.end()] + "\n" + block + report_html[m.end() :]


@pages_router.get("/diffs", response_class=HTMLResponse)
def diffs_page(request: Request) -> str:
    return _page(_LIST, request, listing=list_diffs(_directory(request)), how_make=HOW_TO_MAKE,
                 how_serve=HOW_TO_SERVE)  # fmt: skip


@pages_router.get("/diffs/{name}", response_class=HTMLResponse)
def diff_page(request: Request, name: str, q: Annotated[str | None, Query(max_length=MAX_QUERY_CHARS)] = None) -> str:
    doc = read_report(request, name)
    text = search_text(q)  # blank: no search
    hits = search_report(name, doc, text) if text is not None else []
    try:
        page = render_report(doc)
    except (TemplateError, KeyError, TypeError, AttributeError, ValueError) as exc:  # a report.json with parts
        raise _unshowable("shown", name, exc) from None  # missing or of the wrong kind fails inside the template
    block = _SEARCH.render(name=name, q=text, hits=hit_rows(hits), max_q=MAX_QUERY_CHARS)
    return _with_search(page, block)
