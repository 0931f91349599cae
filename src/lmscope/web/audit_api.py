"""Audit reports in the explorer: /audits (the list), /audits/{name} (the report page) and their JSON under
/api/audits.

The reports are the subdirectories of one directory (`create_app(..., audits=DIR)`, `lmscope serve ATLAS --audits
DIR`) that hold a `report.json`, as `lmscope audit MODEL --out DIR/NAME` writes them. A name is 1-100 letters,
digits, '.', '_' or '-', not starting with '.', so a request names nothing outside the directory. The page is the
report's own self-contained HTML (lmscope.audit.html.render), rendered from its JSON. Nothing here writes.
"""

from __future__ import annotations

import html
import json
import re
from pathlib import Path
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import HTMLResponse

from lmscope.audit.html import render as render_report
from lmscope.audit.report import FORMAT

router = APIRouter(prefix="/api", tags=["audits"])
pages_router = APIRouter(include_in_schema=False)

NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,99}")
OFF = ("the audit view is off: start the explorer with `lmscope serve ATLAS --audits DIR`, DIR holding reports "
       "written by `lmscope audit MODEL --out DIR/NAME`")  # fmt: skip


def _dir(request: Request) -> Path:
    d: Path | None = getattr(request.app.state, "audits_dir", None)
    if d is None:
        raise HTTPException(404, OFF)
    return d


def _load(request: Request, name: str) -> dict[str, Any]:
    if not NAME.fullmatch(name):
        raise HTTPException(404, f"no audit report named {name!r}")
    p = _dir(request) / name / "report.json"
    if not p.is_file():
        raise HTTPException(404, f"no audit report named {name!r} (write one with `lmscope audit MODEL --out "
                                 f"{_dir(request) / name}`)")  # fmt: skip
    try:
        report = json.loads(p.read_text())
    except (ValueError, OSError) as exc:
        raise HTTPException(422, f"the audit report {name!r} is damaged ({exc}); rerun the audit") from None
    if not isinstance(report, dict) or report.get("format") != FORMAT:
        raise HTTPException(422, f"{name!r} holds a report.json that is not an lmscope audit ({FORMAT})")
    return report


def listing(request: Request) -> dict[str, Any]:
    d = _dir(request)
    items = []
    for sub in sorted(d.iterdir()) if d.is_dir() else []:
        p = sub / "report.json"
        if not (sub.is_dir() and NAME.fullmatch(sub.name) and p.is_file()):
            continue
        try:
            r = json.loads(p.read_text())
            if r.get("format") != FORMAT:
                continue
        except (ValueError, OSError):
            continue
        colours = [x.get("colour") for x in r.get("summary", [])]
        counts = {c: colours.count(c) for c in ("red", "amber", "green", "grey")}
        items.append({"name": sub.name, "model": r.get("model"), "reference": r.get("reference"), "lights": counts})
    return {"directory": str(d), "exists": d.is_dir(), "audits": items}


@router.get("/audits")
def list_audits(request: Request) -> dict[str, Any]:
    """The audit reports in the audits directory, each with its model and a count of lights by colour."""
    return listing(request)


@router.get("/audits/{name}")
def audit_json(request: Request, name: str) -> dict[str, Any]:
    """One audit report, as `lmscope audit` wrote it (report.json)."""
    return _load(request, name)


@pages_router.get("/audits", response_class=HTMLResponse)
def audits_page(request: Request) -> str:
    lst = listing(request)
    rows = "".join(
        f'<tr><td><a href="/audits/{html.escape(a["name"])}">{html.escape(a["name"])}</a></td>'
        f"<td><code>{html.escape(str(a['model']))}</code></td><td>{html.escape(str(a['reference'] or '–'))}</td>"
        f"<td>{a['lights']['red']} red · {a['lights']['amber']} amber · {a['lights']['green']} green · "
        f"{a['lights']['grey']} grey</td></tr>"
        for a in lst["audits"]
    )
    body = (f"<table id='audit-table'><tr><th>report</th><th>model</th><th>reference</th><th>lights</th></tr>{rows}"
            "</table>") if rows else (f"<p id='audits-none'>No audit reports in <code>{html.escape(lst['directory'])}"
                                      "</code> yet: write one with <code>lmscope audit MODEL --out "
                                      f"{html.escape(lst['directory'])}/NAME</code>.</p>")  # fmt: skip
    return (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>Audits</title></head><body>"
            f"<p><a href='/'>← the atlas</a></p><h1>Audits</h1>{body}</body></html>")  # fmt: skip


@pages_router.get("/audits/{name}", response_class=HTMLResponse)
def audit_page(request: Request, name: str) -> str:
    page = render_report(_load(request, name))
    return page.replace("<body>", "<body><p><a href='/audits'>← all audits</a> · <a href='/'>the atlas</a></p>", 1)
