"""Writing an atlas build: contexts as they stream, then every other row in one transaction that ends with
`meta.complete = 1`, then compaction. (Labels and scores are written by db/labels.py.)"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from lmscope.atlas.db.schema import Connection, set_meta


def insert_contexts(conn: Connection, first_id: int, tokens: np.ndarray) -> None:
    """Store a batch of contexts (`tokens` is [batch, context]) with ids first_id, first_id + 1, ... (in the
    current transaction; the caller commits)."""
    conn.executemany(
        "INSERT INTO contexts (id, tokens) VALUES (?, ?)",
        [(first_id + i, tokens[i].astype("<i4").tobytes()) for i in range(len(tokens))],
    )


def commit(conn: Connection) -> None:
    conn.commit()


def write_build(
    conn: Connection,
    vocab: list[str],
    feature_rows: Sequence[tuple[Any, ...]],
    example_rows: Sequence[tuple[Any, ...]],
    bin_rows: Sequence[tuple[Any, ...]],
    meta: dict[str, Any],
) -> None:
    """In one transaction (all of it, with `complete = 1` last, or none): the vocabulary, the features (rows in
    DDL column order), the examples (feature, kind, bin, rank, context, pos, act, start, acts, peak_token, text),
    the quantile bins (feature, bin, lo, hi, count), the top examples' text in the full-text index, the `meta`
    entries in order; contexts no example refers to are dropped."""
    with conn:
        conn.executemany("INSERT INTO vocab (id, text) VALUES (?, ?)", list(enumerate(vocab)))
        conn.executemany("INSERT INTO features VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", feature_rows)
        conn.executemany(
            "INSERT INTO examples (feature, kind, bin, rank, context, pos, act, start, acts, peak_token, text) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            example_rows,
        )
        conn.executemany("INSERT INTO quantile_bins VALUES (?, ?, ?, ?, ?)", bin_rows)
        conn.execute(
            "INSERT INTO search (text, feature, kind, ref) SELECT text, feature, 'example', rowid FROM examples "
            "WHERE kind = 'top'"
        )
        conn.execute("DELETE FROM contexts WHERE id NOT IN (SELECT DISTINCT context FROM examples)")
        for key, value in meta.items():
            set_meta(conn, key, value)
        set_meta(conn, "complete", 1)


def compact(conn: Connection) -> None:
    """Reclaim free pages and fold the write-ahead log into the file (after `write_build`)."""
    conn.execute("VACUUM")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
