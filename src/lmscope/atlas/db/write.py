"""Writing an atlas build: contexts as they stream, then every other row in one transaction that ends with
`meta.complete = 1`, then compaction. (Labels and scores are written by db/labels.py.)"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from lmscope.atlas.db.schema import (
    CROSSCODER_DDL,
    CROSSCODER_TABLE,
    SOURCES_TABLE,
    TRIGRAM_RANK_BITS,
    TRIGRAM_STATEMENTS,
    TRIGRAM_TABLE,
    Connection,
    has_table,
    set_meta,
)


def insert_contexts(conn: Connection, first_id: int, tokens: np.ndarray) -> None:
    """Store a batch of contexts (`tokens` is [batch, context]) with ids first_id, first_id + 1, ... (in the
    current transaction; the caller commits)."""
    conn.executemany(
        "INSERT INTO contexts (id, tokens) VALUES (?, ?)",
        [(first_id + i, tokens[i].astype("<i4").tobytes()) for i in range(len(tokens))],
    )


def insert_context_sources(conn: Connection, first_id: int, document: np.ndarray, names: list[str]) -> None:
    """Store where each context of a batch came from: `document` is [batch, context] document indices (into
    `names`; negative or out of range = unknown), one row per run of positions from one document."""
    rows = []
    for i, doc in enumerate(np.asarray(document)):
        change = np.flatnonzero(np.diff(doc)) + 1
        for s in np.concatenate([[0], change]).tolist():
            d = int(doc[s])
            rows.append((first_id + i, int(s), names[d] if 0 <= d < len(names) else ""))
    conn.executemany(f"INSERT INTO {SOURCES_TABLE} (context, start, source) VALUES (?, ?, ?)", rows)


def commit(conn: Connection) -> None:
    conn.commit()


def write_build(
    conn: Connection,
    vocab: list[str],
    feature_rows: Sequence[tuple[Any, ...]],
    example_rows: Sequence[tuple[Any, ...]],
    bin_rows: Sequence[tuple[Any, ...]],
    meta: dict[str, Any],
    crosscoder_rows: Sequence[tuple[Any, ...]] | None = None,
) -> None:
    """In one transaction (all of it, with `complete = 1` last, or none): the vocabulary, the features (rows in
    DDL column order), the examples (feature, kind, bin, rank, context, pos, act, start, acts, peak_token, text),
    the quantile bins (feature, bin, lo, hi, count), the top examples' text in the full-text index, a crosscoder's
    (feature, relative_norm, band) rows when given, the `meta` entries in order; contexts no example refers to are
    dropped."""
    with conn:
        if crosscoder_rows is not None:
            conn.execute(CROSSCODER_DDL)
            conn.executemany(
                f"INSERT INTO {CROSSCODER_TABLE} (feature, relative_norm, band) VALUES (?, ?, ?)", crosscoder_rows
            )
        conn.executemany("INSERT INTO vocab (id, text) VALUES (?, ?)", list(enumerate(vocab)))
        conn.executemany("INSERT INTO features VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", feature_rows)
        # The trigram index is filled in one statement, not row by row by its trigger (several times faster);
        # the trigger is put back for anything inserted later. Same rows as the trigger's.
        trigram = has_table(conn, TRIGRAM_TABLE)
        if trigram:
            conn.execute("DROP TRIGGER IF EXISTS examples_search_trigram")
        conn.executemany(
            "INSERT INTO examples (feature, kind, bin, rank, context, pos, act, start, acts, peak_token, text) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            example_rows,
        )
        if trigram:
            conn.execute(
                f"INSERT INTO {TRIGRAM_TABLE} (rowid, text) SELECT (feature << {TRIGRAM_RANK_BITS}) | rank, text "
                f"FROM examples WHERE kind = 'top' AND rank >= 0 AND rank < {1 << TRIGRAM_RANK_BITS} ORDER BY rowid"
            )
            conn.execute(TRIGRAM_STATEMENTS[1])
        conn.executemany("INSERT INTO quantile_bins VALUES (?, ?, ?, ?, ?)", bin_rows)
        conn.execute(
            "INSERT INTO search (text, feature, kind, ref) SELECT text, feature, 'example', rowid FROM examples "
            "WHERE kind = 'top'"
        )
        conn.execute("DELETE FROM contexts WHERE id NOT IN (SELECT DISTINCT context FROM examples)")
        for key, value in meta.items():
            set_meta(conn, key, value)
        set_meta(conn, "complete", 1)


def write_latent_scaling(conn: Connection, rows: Sequence[tuple[int, float | None, float | None, bool]]) -> int:
    """Set the Latent Scaling ratios of crosscoder latents, (feature, nu_error, nu_recon, robust) each, in one
    transaction; returns the rows changed. The atlas must be a crosscoder's."""
    if not has_table(conn, CROSSCODER_TABLE):
        raise ValueError("this atlas is not a crosscoder's (no crosscoder_latents table)")
    with conn:
        cur = conn.executemany(
            f"UPDATE {CROSSCODER_TABLE} SET nu_error = ?, nu_recon = ?, robust = ? WHERE feature = ?",
            [(e, r, int(ok), int(f)) for f, e, r, ok in rows],
        )
    return int(cur.rowcount)


def compact(conn: Connection, min_free: float = 0.05) -> None:
    """Fold the write-ahead log into the file (after `write_build`), and reclaim free pages when they are at least
    `min_free` of the file (the contexts no example refers to, when there are many). A build leaves few, and VACUUM
    rewrites the whole file, which takes seconds for a large atlas."""
    pages = int(conn.execute("PRAGMA page_count").fetchone()[0])
    free = int(conn.execute("PRAGMA freelist_count").fetchone()[0])
    if free > 0 and free >= min_free * pages:
        conn.execute("VACUUM")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
