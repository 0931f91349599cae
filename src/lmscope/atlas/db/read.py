"""Reading an atlas's features, examples, contexts, vocabulary and full-text index (labels: db/labels.py).

Every value that comes from a user reaches SQL as a bound parameter. Sort columns come from a fixed whitelist;
full-text queries are turned into one quoted FTS5 phrase, so FTS syntax in them is inert. Token blobs come back
as little-endian int32 arrays (read-only views of the stored bytes).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from lmscope.atlas.db.schema import Connection, Row

SORTS = {"id": "id", "density": "density", "max_act": "max_act", "mean_act": "mean_act"}


@dataclass
class FeatureQuery:
    """Filters for the feature list. Every field is optional."""

    sort: str = "id"
    order: str = "asc"
    min_density: float | None = None
    max_density: float | None = None
    min_act: float | None = None
    max_act: float | None = None
    dead: bool = True  # include dead features
    q: str | None = None
    by: str = "text"  # label | text | token
    limit: int = 50
    offset: int = 0


def fts_phrase(q: str) -> str:
    """A user's text as one FTS5 phrase: quotes doubled, so operators and column filters mean nothing."""
    return '"' + q.replace('"', '""') + '"'


def _tokens(blob: bytes) -> np.ndarray:
    return np.frombuffer(blob, dtype="<i4")


# ---------------------------------------------------------------------------------------------------- vocabulary
def vocab_texts(conn: Connection) -> list[str]:
    """Each token id's text, in id order."""
    return [t for (t,) in conn.execute("SELECT text FROM vocab ORDER BY id")]


# ---------------------------------------------------------------------------------------------------- features
def count_features(conn: Connection) -> int:
    return int(conn.execute("SELECT count(*) FROM features").fetchone()[0])


def feature_counts(conn: Connection) -> tuple[int, int]:
    """(features, live features)."""
    total, live = conn.execute("SELECT count(*), coalesce(sum(1 - dead), 0) FROM features").fetchone()
    return int(total), int(live)


def has_feature(conn: Connection, fid: int) -> bool:
    return conn.execute("SELECT 1 FROM features WHERE id = ?", (int(fid),)).fetchone() is not None


def live_feature_ids(conn: Connection) -> list[int]:
    """Ids of the features that fired at least once, ascending."""
    return [int(r[0]) for r in conn.execute("SELECT id FROM features WHERE dead = 0 ORDER BY id")]


def feature_row(conn: Connection, fid: int) -> Row | None:
    """Every column of one feature (see the DDL), or None if there is no such feature."""
    row: Row | None = conn.execute("SELECT * FROM features WHERE id = ?", (int(fid),)).fetchone()
    return row


def feature_max_density(conn: Connection, fid: int) -> tuple[float, float] | None:
    """(max activation, density) of one feature, or None if there is no such feature."""
    row = conn.execute("SELECT max_act, density FROM features WHERE id = ?", (int(fid),)).fetchone()
    return None if row is None else (float(row[0]), float(row[1]))


def max_acts(conn: Connection, fids: list[int]) -> dict[int, float]:
    """The observed max activation of each of `fids` that exists."""
    if not fids:
        return {}
    rows = conn.execute(
        "SELECT id, max_act FROM features WHERE id IN (SELECT value FROM json_each(?))",
        (json.dumps([int(f) for f in fids]),),
    )
    return {int(k): float(v) for k, v in rows}


def densities(conn: Connection) -> list[float]:
    """Every feature's density."""
    return [float(r[0]) for r in conn.execute("SELECT density FROM features")]


def feature_page(conn: Connection, fq: FeatureQuery, candidates: list[int] | None = None) -> tuple[int, list[Row]]:
    """(how many features match, the page of them) for the filters of `fq`. With `candidates` (a search's
    matches, most relevant first) only those match, and sort "relevance" keeps their order."""
    where: list[str] = []
    params: list[Any] = []
    for col, op, val in (
        ("density", ">=", fq.min_density), ("density", "<=", fq.max_density),
        ("max_act", ">=", fq.min_act), ("max_act", "<=", fq.max_act),
    ):  # fmt: skip
        if val is not None:
            where.append(f"{col} {op} ?")
            params.append(float(val))
    if not fq.dead:
        where.append("dead = 0")
    order_sql = f"{SORTS.get(fq.sort, 'id')} {'DESC' if fq.order == 'desc' else 'ASC'}, id ASC"
    source, head = "features", []
    if candidates is not None:
        # the search's candidates, joined with their rank (the order of relevance)
        source = "features JOIN (SELECT value AS fid, key AS ord FROM json_each(?)) AS c ON c.fid = features.id"
        head = [json.dumps(candidates)]
        if fq.sort == "relevance":
            order_sql = "c.ord"
    clause = f"WHERE {' AND '.join(where)}" if where else ""
    total = conn.execute(f"SELECT count(*) FROM {source} {clause}", [*head, *params]).fetchone()[0]
    rows = conn.execute(
        f"SELECT id, density, n_fired, mean_act, max_act, dead FROM {source} {clause} ORDER BY {order_sql} "
        "LIMIT ? OFFSET ?",
        [*head, *params, max(0, min(int(fq.limit), 500)), max(0, int(fq.offset))],
    ).fetchall()
    return int(total), rows


def strong_features(conn: Connection, n: int, min_density: float, max_density: float) -> list[tuple[Any, ...]]:
    """Live features with logit effects and a density in [min_density, max_density], those with a well-scored
    machine label first, then by max activation: (id, max_act, logits JSON, comma-separated peak tokens of the
    top examples)."""
    rows = conn.execute(
        """SELECT f.id, f.max_act, f.logits,
                  (SELECT group_concat(e.peak_token) FROM examples e WHERE e.feature = f.id AND e.kind = 'top')
           FROM features f
           LEFT JOIN labels l ON l.feature = f.id AND l.source = 'machine'
           WHERE f.dead = 0 AND f.density BETWEEN ? AND ? AND f.logits IS NOT NULL
           ORDER BY coalesce(l.score, 0) DESC, f.max_act DESC LIMIT ?""",
        (min_density, max_density, int(n)),
    ).fetchall()
    return [tuple(r) for r in rows]


# ---------------------------------------------------------------------------------------------------- examples
def example_windows(conn: Connection, fid: int) -> list[tuple[Any, ...]]:
    """(kind, bin, rank, context, pos, start, acts blob) of each example of a feature: top examples first, then
    quantile bins from the highest, each by rank."""
    rows = conn.execute(
        "SELECT kind, bin, rank, context, pos, start, acts FROM examples WHERE feature = ? "
        "ORDER BY kind DESC, bin DESC, rank",
        (int(fid),),
    ).fetchall()
    return [tuple(r) for r in rows]


def examples_with_contexts(conn: Connection, fid: int) -> list[Row]:
    """Every column of each example of a feature plus its context's token blob (`ctx`): top examples first,
    then quantile bins from the lowest, each by rank."""
    return conn.execute(
        "SELECT e.*, c.tokens AS ctx FROM examples e JOIN contexts c ON c.id = e.context WHERE e.feature = ? "
        "ORDER BY e.kind DESC, e.bin, e.rank",
        (int(fid),),
    ).fetchall()


def quantile_bins(conn: Connection, fid: int) -> list[Row]:
    """A feature's quantile bins (feature, bin, lo, hi, count), highest first."""
    return conn.execute("SELECT * FROM quantile_bins WHERE feature = ? ORDER BY bin DESC", (int(fid),)).fetchall()


# ---------------------------------------------------------------------------------------------------- contexts
def context_ids(conn: Connection) -> list[int]:
    """Ids of the stored contexts, ascending."""
    return [int(r[0]) for r in conn.execute("SELECT id FROM contexts ORDER BY id")]


def context_tokens(conn: Connection, cid: int) -> np.ndarray | None:
    """The token ids of one context, or None if it is not stored."""
    row = conn.execute("SELECT tokens FROM contexts WHERE id = ?", (int(cid),)).fetchone()
    return None if row is None else _tokens(row[0])


def iter_contexts(conn: Connection) -> Iterator[tuple[int, np.ndarray]]:
    """(id, token ids) of every stored context."""
    for cid, blob in conn.execute("SELECT id, tokens FROM contexts"):
        yield int(cid), _tokens(blob)


# ---------------------------------------------------------------------------------------------------- search
def features_peaking_on(conn: Connection, token_ids: list[int], limit: int) -> list[int]:
    """Features whose top examples peak on any of `token_ids`: those with the most such examples first (ties:
    the higher activation)."""
    rows = conn.execute(
        "SELECT feature, count(*) AS n, max(act) AS a FROM examples WHERE kind = 'top' AND peak_token IN "
        "(SELECT value FROM json_each(?)) GROUP BY feature ORDER BY n DESC, a DESC LIMIT ?",
        (json.dumps(token_ids), int(limit)),
    )
    return [r[0] for r in rows]


def features_matching(conn: Connection, text: str, kind: str, limit: int) -> list[int]:
    """Features whose `kind` rows of the full-text index ('label', or 'example': top-example text) contain
    `text` as a phrase; relevance first (how many of the feature's rows contain it), then by id."""
    rows = conn.execute(
        "SELECT feature, count(*) AS n FROM search WHERE search MATCH ? AND kind = ? "
        "GROUP BY feature ORDER BY n DESC, feature LIMIT ?",
        (fts_phrase(text), kind, int(limit)),
    )
    return [int(r[0]) for r in rows]
