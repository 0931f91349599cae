"""The feature map and families in the explorer: the page /map and the JSON API under /api (map, families, a
feature's families). The data come from the atlas's optional families tables (lmscope.atlas.family_map); an atlas
without them answers 404 in the API and a page that says how to add them (`lmscope families ATLAS`).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import HTMLResponse

from lmscope.atlas.family_map import (
    families_list,
    family_detail,
    feature_families,
    map_payload,
    no_map_message,
)
from lmscope.atlas.store import AtlasStore
from lmscope.web.pages import render
from lmscope.web.state import store_of

router = APIRouter(prefix="/api", tags=["families"])
pages_router = APIRouter(include_in_schema=False)


def map_page_context(store: AtlasStore, static: bool = False, exported: int | None = None) -> dict[str, Any]:
    """What the map page shows (also rendered by the static export): the payload for its script, or the message
    that the atlas has none. A static site links features to features/ID.html, those not exported to the list."""
    data = map_payload(store.conn)
    if data is not None:
        data["links"] = {"static": static, "exported": store.n_features if exported is None else exported}
    return {"data": data, "no_map": no_map_message(store.path) if data is None else None,
            "quality": (data or {}).get("meta", {}).get("quality", [])}  # fmt: skip


@pages_router.get("/map", response_class=HTMLResponse)
def map_page(request: Request) -> str:
    return render("map.html", request, **map_page_context(store_of(request)))


def _no_map(store: AtlasStore) -> HTTPException:
    return HTTPException(404, no_map_message(store.path))


@router.get("/map")
def map_json(request: Request) -> dict[str, Any]:
    """The map: every live feature's position, shown label and family at each level; the families (without their
    member lists: /api/families has them); how they were computed and their quality figures (`meta`)."""
    store = store_of(request)
    data = map_payload(store.conn, members=False)
    if data is None:
        raise _no_map(store)
    return data


@router.get("/families")
def families_json(request: Request, level: int | None = Query(None, ge=0, le=1000)) -> dict[str, Any]:
    """The families of one level (all levels without `level`), each with its label, terms, members and cohesion."""
    store = store_of(request)
    rows = families_list(store.conn, level)
    if rows is None:
        raise _no_map(store)
    if level is not None and not rows:
        raise HTTPException(404, f"the map has no level {level}; levels run from 0 (coarsest) up")
    return {"level": level, "families": rows}


@router.get("/families/{family}")
def family_json(request: Request, family: int) -> dict[str, Any]:
    """One family with its members' labels, its parent and its children."""
    store = store_of(request)
    fam = family_detail(store.conn, family)
    if fam is None:
        if families_list(store.conn, 0) is None:
            raise _no_map(store)
        raise HTTPException(404, f"family {family} does not exist (see /api/families for the ids)")
    return fam


@router.get("/features/{fid}/families")
def feature_families_json(request: Request, fid: int) -> dict[str, Any]:
    """The families of feature `fid`, coarsest first ([] for a dead feature: it is not on the map)."""
    store = store_of(request)
    if not 0 <= fid < store.n_features:
        raise HTTPException(404, f"feature {fid} does not exist; ids run from 0 to {store.n_features - 1}")
    fams = feature_families(store.conn, fid)
    if fams is None:
        raise _no_map(store)
    return {"id": fid, "families": fams}
