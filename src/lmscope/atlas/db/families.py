"""Feature families and the 2-D map of an atlas: two optional tables and the `families` meta entry.

Optional, within schema version 2 (like `context_sources`): an atlas built before families existed, or with them
turned off, has neither table, and readers treat that as "no map" (`has_families`). `lmscope families ATLAS` adds
them to such an atlas, or recomputes them, in one transaction (`write_families`): a failed run leaves the file as
it was. What the rows mean is decided by lmscope.atlas.families; this module only stores and reads them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from lmscope.atlas.db.schema import Connection, get_meta, has_table, set_meta

FAMILIES_TABLE = "families"
MAP_TABLE = "family_map"
META_KEY = "families"
FAMILIES_DDL = f"""CREATE TABLE {FAMILIES_TABLE} (
    id          INTEGER PRIMARY KEY,       -- family id, unique across levels (coarsest level first)
    level       INTEGER NOT NULL,          -- 0 the coarsest cut of the hierarchy
    parent      INTEGER,                   -- the family of the level above that holds it (NULL at level 0)
    size        INTEGER NOT NULL,          -- live features in it
    label       TEXT NOT NULL,             -- from its members, e.g. "7 of 9 members: 'digits'", or "mixed ..."
    terms       TEXT NOT NULL,             -- JSON [{"term", "kind", "count", "share", "base"}...], most shared first
    x           REAL NOT NULL,             -- centroid of its members on the map
    y           REAL NOT NULL,
    cos_within  REAL,                      -- mean decoder cosine over pairs of members (NULL for one member)
    cofire_within REAL,                    -- mean co-firing over pairs of members (NULL for one member)
    members     TEXT NOT NULL              -- JSON [feature ids], ascending
)"""
MAP_DDL = f"""CREATE TABLE {MAP_TABLE} (
    feature  INTEGER PRIMARY KEY,          -- features.id: live features only (dead ones have no place)
    x        REAL NOT NULL,
    y        REAL NOT NULL,
    families TEXT NOT NULL                 -- JSON [family id at level 0, level 1, ...]
)"""
FAMILY_COLUMNS = "id, level, parent, size, label, terms, x, y, cos_within, cofire_within"


def has_families(conn: Connection) -> bool:
    """Whether the atlas holds families and a map (`lmscope families ATLAS` adds them to one that does not)."""
    return has_table(conn, FAMILIES_TABLE) and has_table(conn, MAP_TABLE)


# ---------------------------------------------------------------------------------------------------- inputs
def cofire_lists(conn: Connection, fids: list[int]) -> dict[int, list[list[float]]]:
    """Each of `fids`'s stored co-firing partners: [[feature, count, fraction]...] (features.cofire)."""
    rows = conn.execute(
        "SELECT id, cofire FROM features WHERE id IN (SELECT value FROM json_each(?))", (json.dumps(fids),)
    )
    return {int(i): json.loads(c) for i, c in rows}


def peak_tokens(conn: Connection, fids: list[int]) -> dict[int, list[int]]:
    """The peak token id of each top example of each of `fids`, by rank."""
    rows = conn.execute(
        "SELECT feature, peak_token FROM examples WHERE kind = 'top' AND feature IN (SELECT value FROM json_each(?)) "
        "ORDER BY feature, rank",
        (json.dumps(fids),),
    )
    out: dict[int, list[int]] = {}
    for f, t in rows:
        out.setdefault(int(f), []).append(int(t))
    return out


# ---------------------------------------------------------------------------------------------------- writing
def write_families(
    conn: Connection, family_rows: Sequence[tuple[Any, ...]], map_rows: Sequence[tuple[Any, ...]], meta: dict[str, Any]
) -> None:
    """Replace the families, the map and the `families` meta entry in one transaction (all of it or none).
    `family_rows` are in DDL column order with `terms` and `members` as JSON; `map_rows` (feature, x, y,
    families JSON)."""
    conn.commit()  # nothing of the caller's is left pending in this transaction
    conn.execute("BEGIN IMMEDIATE")  # DDL too: the implicit transactions of the driver start only at DML
    try:
        conn.execute(f"DROP TABLE IF EXISTS {FAMILIES_TABLE}")
        conn.execute(f"DROP TABLE IF EXISTS {MAP_TABLE}")
        conn.execute(FAMILIES_DDL)
        conn.execute(MAP_DDL)
        conn.executemany(f"INSERT INTO {FAMILIES_TABLE} VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", family_rows)
        conn.executemany(f"INSERT INTO {MAP_TABLE} VALUES (?, ?, ?, ?)", map_rows)
        set_meta(conn, META_KEY, meta)
        conn.commit()
    except BaseException:
        conn.rollback()
        raise


# ---------------------------------------------------------------------------------------------------- reading
def families_meta(conn: Connection) -> dict[str, Any] | None:
    """How the families were computed (settings, timings, quality figures), or None without families."""
    if not has_families(conn):
        return None
    meta: dict[str, Any] | None = get_meta(conn, META_KEY)
    return meta


def map_points(conn: Connection) -> list[tuple[int, float, float, list[int]]]:
    """(feature, x, y, [family id per level]) of every feature on the map, by feature id."""
    rows = conn.execute(f"SELECT feature, x, y, families FROM {MAP_TABLE} ORDER BY feature")
    return [(int(f), float(x), float(y), json.loads(fam)) for f, x, y, fam in rows]


def _family(row: Any, members: bool) -> dict[str, Any]:
    d = {k: row[k] for k in ("id", "level", "parent", "size", "label", "x", "y", "cos_within", "cofire_within")}
    d["terms"] = json.loads(row["terms"])
    if members:
        d["members"] = json.loads(row["members"])
    return d


def family_rows(conn: Connection, level: int | None = None, members: bool = True) -> list[dict[str, Any]]:
    """The families (of one level, or all), by id: every column, `terms` and `members` decoded."""
    cols = FAMILY_COLUMNS + (", members" if members else "")
    if level is None:
        rows = conn.execute(f"SELECT {cols} FROM {FAMILIES_TABLE} ORDER BY id")
    else:
        rows = conn.execute(f"SELECT {cols} FROM {FAMILIES_TABLE} WHERE level = ? ORDER BY id", (int(level),))
    return [_family(r, members) for r in rows]


def family_row(conn: Connection, family: int) -> dict[str, Any] | None:
    """One family with its members, or None if there is no such family."""
    sql = f"SELECT {FAMILY_COLUMNS}, members FROM {FAMILIES_TABLE} WHERE id = ?"
    row = conn.execute(sql, (int(family),)).fetchone()
    return None if row is None else _family(row, True)


def children_of(conn: Connection, family: int) -> list[int]:
    """The families of the level below whose parent is `family`, by id."""
    return [int(r[0]) for r in conn.execute(f"SELECT id FROM {FAMILIES_TABLE} WHERE parent = ? ORDER BY id",
                                            (int(family),))]  # fmt: skip


def families_of_feature(conn: Connection, feature: int) -> list[int] | None:
    """The family of `feature` at each level, coarsest first; None when it is not on the map (dead, or no id)."""
    row = conn.execute(f"SELECT families FROM {MAP_TABLE} WHERE feature = ?", (int(feature),)).fetchone()
    return None if row is None else [int(f) for f in json.loads(row[0])]
