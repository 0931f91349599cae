"""A feature's partners in another dictionary, from a match report (`lmscope serve ATLAS --match match.json`).

The report (`lmscope match A B --out match.json`) pairs the features of two dictionaries; the atlas is one of them.
Which side is found from the atlas's provenance (the dictionary's tensor hash, else its path); a report that does
not include the atlas's dictionary is refused when the server starts. Each feature page then lists its partners
(those of the matching, then the best by score, per method), and /api/features/{id}/partners answers the same in
JSON. A partner links to `PARTNER_URL/features/{id}` when the server is given the address of an explorer serving
the other dictionary's atlas (`--partner-url`); otherwise it is named by its id.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import APIRouter, HTTPException, Request

from lmscope.atlas.store import AtlasStore
from lmscope.errors import MatchError
from lmscope.universality.report import load_report, partners, side_of

router = APIRouter(prefix="/api", tags=["match"])


@dataclass
class MatchView:
    """A loaded match report and which side of it the served atlas is."""

    report: dict[str, Any]
    side: str
    path: Path
    partner_url: str | None = None

    def partners(self, fid: int) -> dict[str, Any]:
        p = partners(self.report, self.side, fid)
        base = self.partner_url.rstrip("/") if self.partner_url else None
        for m in p["methods"].values():
            for row in (*m["matched"], *m["top"]):
                row["url"] = f"{base}/features/{row['id']}" if base else None
        p["linked"] = base is not None
        other = p["other"]
        path = Path(other.get("path") or "")
        p["other_name"] = "/".join(path.parts[-2:]) if path.parts else "the other dictionary"
        return p


def load_match(store: AtlasStore, path: str | Path, partner_url: str | None = None) -> MatchView:
    """The report at `path` as the atlas `store` sees it; MatchError when the atlas's dictionary is not in it."""
    report = load_report(path)
    dic = store.provenance.get("dictionary") or {}
    side = side_of(report, dic.get("sha256"), dic.get("path"))
    if side is None:
        raise MatchError(
            f"the match report {path} pairs {report['a'].get('path') or 'A'} with {report['b'].get('path') or 'B'}; "
            f"neither is this atlas's dictionary ({dic.get('path') or 'unrecorded'}): pass a report of a match that "
            "includes it (`lmscope match THIS_DICT OTHER_DICT`)"
        )
    if partner_url is not None and not partner_url.startswith(("http://", "https://", "/")):
        raise MatchError(f"--partner-url must be an http(s) address or a path, got {partner_url!r}")
    return MatchView(report, side, Path(path), partner_url)


def match_of(request: Request) -> MatchView | None:
    """The served match report, or None when the server was started without --match."""
    view: MatchView | None = getattr(request.app.state, "match", None)
    return view


@router.get("/features/{fid}/partners")
def feature_partners(request: Request, fid: int) -> dict[str, Any]:
    """Feature `fid`'s partners in the other dictionary of the served match report, per method."""
    view = match_of(request)
    if view is None:
        raise HTTPException(404, "no match report is loaded: start the explorer with `lmscope serve ATLAS --match "
                                 "match.json` (a report of `lmscope match`)")  # fmt: skip
    store: AtlasStore = request.app.state.store
    if not 0 <= fid < store.n_features:
        raise HTTPException(404, f"feature {fid} does not exist; ids run from 0 to {store.n_features - 1}")
    return view.partners(fid)


@router.get("/match")
def match_summary(request: Request) -> dict[str, Any]:
    """The served match report without its per-feature lists: both dictionaries, the settings, each method's figures
    beside its baseline's, and which side this atlas is."""
    view = match_of(request)
    if view is None:
        raise HTTPException(404, "no match report is loaded (lmscope serve ATLAS --match match.json)")
    r = view.report
    methods = {name: {k: v for k, v in m.items() if k not in ("features", "silent")}
               for name, m in r.get("methods", {}).items()}  # fmt: skip
    return {"side": view.side, "a": r.get("a"), "b": r.get("b"), "config": r.get("config"),
            "activation_pass": r.get("activation_pass"), "methods": methods, "path": str(view.path)}  # fmt: skip
