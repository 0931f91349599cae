"""Reading an atlas's features, examples, contexts, vocabulary and full-text index (labels: db/labels.py).

Every value that comes from a user reaches SQL as a bound parameter. Sort columns come from a fixed whitelist;
full-text queries are turned into one quoted FTS5 phrase, so FTS syntax in them is inert; NUL characters are
dropped from them (FTS5 cannot parse one). Ids and offsets beyond SQLite's 64-bit integers match nothing instead
of raising. Token blobs come back as little-endian int32 arrays (read-only views of the stored bytes).

Example-text search is a case-insensitive substring search: through the trigram index (`search_trigram`, see
schema.py) when the atlas has one and the text is at least 3 characters long, else, in an atlas built before that
index, through the word index for text made of words, else by scanning the top examples' text.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from lmscope.atlas.db.schema import (
    CROSSCODER_TABLE,
    SOURCES_TABLE,
    TRIGRAM_RANK_BITS,
    TRIGRAM_TABLE,
    Connection,
    Row,
    has_table,
)

SORTS = {
    "id": "id",
    "density": "density",
    "max_act": "max_act",
    "mean_act": "mean_act",
    "relative_norm": "x.relative_norm",
}  # the last only in a crosscoder's atlas (else by id)
INT64_MAX = 2**63 - 1
TRIGRAM_MIN_CHARS = 3  # the trigram index cannot answer shorter text
_WORDS = re.compile(r"[^\W_]+(\s+[^\W_]+)*")  # text the word (unicode61) index reads exactly as written


def in_int64(x: int) -> bool:
    """Whether `x` fits SQLite's integers (a larger one cannot be bound, and names no row)."""
    return -INT64_MAX - 1 <= int(x) <= INT64_MAX


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
    band: str | None = None  # a crosscoder's atlas: only latents of this relative-norm band
    limit: int = 50
    offset: int = 0


def fts_phrase(q: str) -> str:
    """A user's text as one FTS5 phrase: quotes doubled, so operators and column filters mean nothing; NUL
    characters dropped (FTS5 reads one as the end of the query)."""
    return '"' + q.replace("\x00", "").replace('"', '""') + '"'


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
    if not in_int64(fid):
        return False
    return conn.execute("SELECT 1 FROM features WHERE id = ?", (int(fid),)).fetchone() is not None


def live_feature_ids(conn: Connection) -> list[int]:
    """Ids of the features that fired at least once, ascending."""
    return [int(r[0]) for r in conn.execute("SELECT id FROM features WHERE dead = 0 ORDER BY id")]


def feature_row(conn: Connection, fid: int) -> Row | None:
    """Every column of one feature (see the DDL), or None if there is no such feature."""
    if not in_int64(fid):
        return None
    row: Row | None = conn.execute("SELECT * FROM features WHERE id = ?", (int(fid),)).fetchone()
    return row


def feature_max_density(conn: Connection, fid: int) -> tuple[float, float] | None:
    """(max activation, density) of one feature, or None if there is no such feature."""
    if not in_int64(fid):
        return None
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
    """Every feature's density, in feature order."""
    return [float(r[0]) for r in conn.execute("SELECT density FROM features ORDER BY id")]


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
    cross = is_crosscoder(conn)
    sort = SORTS.get(fq.sort, "id") if cross or fq.sort != "relative_norm" else "id"
    order_sql = f"{sort} {'DESC' if fq.order == 'desc' else 'ASC'} NULLS LAST, id ASC"
    source, head = "features", []
    if fq.band is not None:
        if not cross:
            return 0, []
        where.append("x.band = ?")
        params.append(fq.band)
    if candidates is not None:
        # the search's candidates, joined with their rank (the order of relevance)
        source = "features JOIN (SELECT value AS fid, key AS ord FROM json_each(?)) AS c ON c.fid = features.id"
        head = [json.dumps(candidates)]
        if fq.sort == "relevance":
            order_sql = "c.ord"
    if cross:
        source += f" LEFT JOIN {CROSSCODER_TABLE} AS x ON x.feature = features.id"
    rel = "x.relative_norm" if cross else "NULL"
    clause = f"WHERE {' AND '.join(where)}" if where else ""
    total = conn.execute(f"SELECT count(*) FROM {source} {clause}", [*head, *params]).fetchone()[0]
    rows = conn.execute(
        f"SELECT id, density, n_fired, mean_act, max_act, dead, {rel} AS relative_norm FROM {source} {clause} "
        f"ORDER BY {order_sql} "
        "LIMIT ? OFFSET ?",
        [*head, *params, max(0, min(int(fq.limit), 500)), max(0, min(int(fq.offset), INT64_MAX))],
    ).fetchall()
    return int(total), rows


def is_crosscoder(conn: Connection) -> bool:
    """Whether the atlas is a two-model crosscoder's (it has per-latent relative norms)."""
    return has_table(conn, CROSSCODER_TABLE)


def crosscoder_latent(conn: Connection, fid: int) -> dict[str, Any] | None:
    """A crosscoder latent's relative norm, band and Latent Scaling ratios (None: not a crosscoder's atlas)."""
    if not in_int64(fid) or not is_crosscoder(conn):
        return None
    row = conn.execute(
        f"SELECT relative_norm, band, nu_error, nu_recon, robust FROM {CROSSCODER_TABLE} WHERE feature = ?",
        (int(fid),),
    ).fetchone()
    if row is None:
        return None
    return {"relative_norm": row[0], "band": row[1], "nu_error": row[2], "nu_recon": row[3],
            "robust": None if row[4] is None else bool(row[4])}  # fmt: skip


def band_counts(conn: Connection) -> dict[str, int]:
    """How many latents fall in each relative-norm band ({} when the atlas is not a crosscoder's)."""
    if not is_crosscoder(conn):
        return {}
    rows = conn.execute(f"SELECT band, count(*) FROM {CROSSCODER_TABLE} GROUP BY band ORDER BY band")
    return {str(b): int(n) for b, n in rows}


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


def example_windows_many(conn: Connection, fids: list[int]) -> dict[int, list[tuple[Any, ...]]]:
    """`example_windows` of each of `fids` (same rows, same order), read in one query."""
    out: dict[int, list[tuple[Any, ...]]] = {}
    if not fids:
        return out
    rows = conn.execute(
        "SELECT feature, kind, bin, rank, context, pos, start, acts FROM examples WHERE feature IN "
        "(SELECT value FROM json_each(?)) ORDER BY feature, kind DESC, bin DESC, rank",
        (json.dumps([int(f) for f in fids if in_int64(f)]),),
    )
    for r in rows:
        out.setdefault(int(r[0]), []).append(tuple(r[1:]))
    return out


def max_density_many(conn: Connection, fids: list[int]) -> dict[int, tuple[float, float]]:
    """`feature_max_density` of each of `fids` that exists, read in one query."""
    if not fids:
        return {}
    rows = conn.execute(
        "SELECT id, max_act, density FROM features WHERE id IN (SELECT value FROM json_each(?))",
        (json.dumps([int(f) for f in fids if in_int64(f)]),),
    )
    return {int(k): (float(a), float(d)) for k, a, d in rows}


def examples_with_contexts(conn: Connection, fid: int) -> list[Row]:
    """Every column of each example of a feature plus its context's token blob (`ctx`): top examples first,
    then quantile bins from the lowest, each by rank."""
    return conn.execute(
        "SELECT e.*, c.tokens AS ctx FROM examples e JOIN contexts c ON c.id = e.context WHERE e.feature = ? "
        "ORDER BY e.kind DESC, e.bin, e.rank",
        (int(fid),),
    ).fetchall()


def top_example_rows(conn: Connection, fids: list[int]) -> list[Row]:
    """The top examples of `fids`, by feature then rank: feature, pos, start, peak_token, text and the context's
    token blob (`ctx`)."""
    if not fids:
        return []
    return conn.execute(
        "SELECT e.feature, e.pos, e.start, e.peak_token, e.text, c.tokens AS ctx FROM examples e "
        "JOIN contexts c ON c.id = e.context WHERE e.kind = 'top' AND e.feature IN (SELECT value FROM json_each(?)) "
        "ORDER BY e.feature, e.rank",
        (json.dumps([int(f) for f in fids if in_int64(f)]),),
    ).fetchall()


def start_counts(conn: Connection, fids: list[int], max_pos: int = 1) -> dict[int, tuple[int, int]]:
    """For each of `fids` with top examples: (how many of them are at context position <= `max_pos`, how many
    there are)."""
    if not fids:
        return {}
    rows = conn.execute(
        "SELECT feature, sum(pos <= ?), count(*) FROM examples WHERE kind = 'top' AND feature IN "
        "(SELECT value FROM json_each(?)) GROUP BY feature",
        (int(max_pos), json.dumps([int(f) for f in fids if in_int64(f)])),
    )
    return {int(f): (int(k), int(n)) for f, k, n in rows}


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


def context_sources(conn: Connection, cid: int) -> list[tuple[int, str]]:
    """(start position, document name) runs of one context, ascending; [] if the atlas stores no sources."""
    if not has_table(conn, SOURCES_TABLE):
        return []
    rows = conn.execute(f"SELECT start, source FROM {SOURCES_TABLE} WHERE context = ? ORDER BY start", (int(cid),))
    return [(int(s), str(n)) for s, n in rows]


def first_context_tokens(conn: Connection, n: int = 64) -> set[int]:
    """The distinct first tokens of (up to) `n` stored contexts."""
    rows = conn.execute("SELECT tokens FROM contexts ORDER BY id LIMIT ?", (int(n),))
    return {int(_tokens(blob)[0]) for (blob,) in rows if len(blob) >= 4}


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


def has_trigram_index(conn: Connection) -> bool:
    """Whether the atlas has the trigram index of its top examples' text (atlases built since it exists)."""
    return has_table(conn, TRIGRAM_TABLE)


def features_matching(conn: Connection, text: str, kind: str, limit: int) -> list[int]:
    """Features whose `kind` rows match `text`, relevance first (how many of the feature's rows match), then by
    id. 'label': labels containing `text` as a phrase of words (the word index). 'example': top examples whose
    text contains `text`, case-insensitive, punctuation included (see the module's docstring)."""
    text = text.replace("\x00", "")
    if not text.strip():
        return []
    if kind == "example":
        return _features_with_example_text(conn, text, limit)
    return _word_matches(conn, text, kind, limit)


def _word_matches(conn: Connection, text: str, kind: str, limit: int) -> list[int]:
    rows = conn.execute(
        "SELECT feature, count(*) AS n FROM search WHERE search MATCH ? AND kind = ? "
        "GROUP BY feature ORDER BY n DESC, feature LIMIT ?",
        (fts_phrase(text), kind, int(limit)),
    )
    return [int(r[0]) for r in rows]


def _features_with_example_text(conn: Connection, text: str, limit: int) -> list[int]:
    trigram = has_trigram_index(conn)
    if trigram and len(text) >= TRIGRAM_MIN_CHARS:
        rows = conn.execute(
            f"SELECT rowid >> {TRIGRAM_RANK_BITS} AS feature, count(*) AS n FROM {TRIGRAM_TABLE} "
            f"WHERE {TRIGRAM_TABLE} MATCH ? GROUP BY feature ORDER BY n DESC, feature LIMIT ?",
            (fts_phrase(text), int(limit)),
        )
        return [int(r[0]) for r in rows]
    if not trigram and _WORDS.fullmatch(text.strip()):
        return _word_matches(conn, text, "example", limit)
    # short text, or punctuation in an atlas without the trigram index: scan the top examples' text
    rows = conn.execute(
        "SELECT feature, count(*) AS n FROM examples WHERE kind = 'top' AND instr(lower(text), lower(?)) > 0 "
        "GROUP BY feature ORDER BY n DESC, feature LIMIT ?",
        (text, int(limit)),
    )
    return [int(r[0]) for r in rows]
