"""Read-side views of an atlas's families and map, JSON-ready: what the explorer's map page, its API and the feature
pages show (lmscope.web.map_api). The rows are read by lmscope.atlas.db.families; lmscope.atlas.families made them.

An atlas without them (built before families existed, or with `AtlasConfig.families` off) answers `no_map_message`,
which names the command that adds them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmscope.atlas.db import read
from lmscope.atlas.db.families import (
    children_of,
    families_meta,
    families_of_feature,
    family_row,
    family_rows,
    has_families,
    map_points,
)
from lmscope.atlas.db.labels import shown_labels
from lmscope.atlas.db.schema import Connection

MAX_POINT_LABEL = 120  # characters of a feature's label in the map's hover text


def no_map_message(atlas: str | Path) -> str:
    return (f"this atlas has no feature map (it was built before families existed, or with them turned off); add one "
            f"with `lmscope families {atlas}`")  # fmt: skip


def _short(text: str) -> str:
    return text if len(text) <= MAX_POINT_LABEL else text[: MAX_POINT_LABEL - 1] + "…"


def map_payload(conn: Connection, members: bool = True) -> dict[str, Any] | None:
    """Everything the map page draws, or None without a map: `meta` (settings, timings, quality), `levels`
    (families per level), `points` (columns: id, x, y, label, families: per point its family id at each level) and
    `families` (every level's, by id, with their members when `members`)."""
    if not has_families(conn):
        return None
    meta = families_meta(conn) or {}
    pts = map_points(conn)
    ids = [p[0] for p in pts]
    labels = shown_labels(conn, ids)
    return {
        "meta": meta,
        "levels": meta.get("levels", []),
        "level_offsets": meta.get("level_offsets", []),
        "points": {
            "id": ids,
            "x": [p[1] for p in pts],
            "y": [p[2] for p in pts],
            "families": [p[3] for p in pts],
            "label": [_short(str(labels[f]["text"])) if f in labels else None for f in ids],
        },
        "families": family_rows(conn, members=members),
    }


def families_list(conn: Connection, level: int | None = None) -> list[dict[str, Any]] | None:
    """The families of one level (or all) with their members, or None without a map."""
    if not has_families(conn):
        return None
    return family_rows(conn, level)


def family_detail(conn: Connection, family: int) -> dict[str, Any] | None:
    """One family: its row, its members with their shown labels (`members`: [{"id", "label"}...]), its parent's and
    children's ids and labels. None when the atlas has no map or no such family."""
    if not has_families(conn) or not read.in_int64(family):
        return None
    fam = family_row(conn, family)
    if fam is None:
        return None
    labels = shown_labels(conn, fam["members"])
    fam["members"] = [{"id": m, "label": labels.get(m)} for m in fam["members"]]
    parent = family_row(conn, fam["parent"]) if fam["parent"] is not None else None
    fam["parent"] = None if parent is None else {"id": parent["id"], "label": parent["label"], "size": parent["size"]}
    kids = [family_row(conn, c) for c in children_of(conn, family)]
    fam["children"] = [{"id": k["id"], "label": k["label"], "size": k["size"]} for k in kids if k is not None]
    return fam


def feature_families(conn: Connection, feature: int) -> list[dict[str, Any]] | None:
    """The families of `feature`, coarsest first ({"id", "level", "size", "label"} each): None when the atlas has no
    map, [] when the feature is not on it (a dead feature)."""
    if not has_families(conn):
        return None
    fams = families_of_feature(conn, feature) if read.in_int64(feature) else None
    out = []
    for fid in fams or []:
        row = family_row(conn, fid)
        if row is not None:
            out.append({"id": row["id"], "level": row["level"], "size": row["size"], "label": row["label"]})
    return out
