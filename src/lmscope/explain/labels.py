"""Labels in the atlas's `labels` table (schema in atlas/schema.py; the FTS `search` index follows by trigger).

- A machine label replaces the same explainer's previous machine label for that feature, and nothing else.
- A human label replaces the feature's previous human label; machines never touch human rows.
- Features that already carry a machine label from an explainer are skipped when it runs again (resumable).
- Scores (schema v2): one `scores` row per (label, scorer), replaced when that scorer runs again; the label's
  own `score`/`scorer` columns keep the latest one (what v1 readers and the list views show). Deleting a
  label deletes its scores (trigger).
Every write is one transaction.
"""

from __future__ import annotations

import datetime as dt
import sqlite3
from pathlib import Path
from typing import Any

from lmscope.atlas.schema import add_label, label_scores, open_atlas
from lmscope.explain.ops import ExplainError

MAX_LABEL_CHARS = 500


def open_rw(path: str | Path, migrate: bool = True) -> sqlite3.Connection:
    """The atlas opened for writing (a running explorer keeps reading it: the file is in WAL mode). A version-1
    file is migrated to the current schema first, unless `migrate` is False (the explorer's human-label
    routes, which touch only the `labels` table)."""
    conn = open_atlas(path, readonly=False, migrate=migrate)
    conn.execute("PRAGMA busy_timeout = 10000")
    return conn


def _check_feature(conn: sqlite3.Connection, feature: int) -> None:
    if conn.execute("SELECT 1 FROM features WHERE id = ?", (int(feature),)).fetchone() is None:
        n = conn.execute("SELECT count(*) FROM features").fetchone()[0]
        raise ExplainError(f"feature {feature} is not in this atlas; features run from 0 to {n - 1}")


def _check_text(text: str) -> str:
    text = " ".join(text.split())
    if not text:
        raise ExplainError("the label is empty; give a short description of what the feature fires on")
    if len(text) > MAX_LABEL_CHARS:
        raise ExplainError(f"the label is {len(text)} characters; keep it under {MAX_LABEL_CHARS}")
    return text


def write_machine_label(conn: sqlite3.Connection, feature: int, text: str, explainer: str,
                        score: float | None = None, scorer: str | None = None) -> int:  # fmt: skip
    """Replace `explainer`'s machine label of `feature`; returns the new label id."""
    _check_feature(conn, feature)
    text = _check_text(text)
    with conn:
        conn.execute("DELETE FROM labels WHERE feature = ? AND source = 'machine' AND explainer = ?",
                     (int(feature), explainer))  # fmt: skip
        return add_label(conn, feature, text, source="machine", explainer=explainer, score=score, scorer=scorer)


def set_human_label(conn: sqlite3.Connection, feature: int, text: str, author: str | None = None) -> int:
    """Set (or correct) the human label of `feature`; machine labels stay as they are. Returns the label id."""
    _check_feature(conn, feature)
    text = _check_text(text)
    with conn:
        conn.execute("DELETE FROM labels WHERE feature = ? AND source = 'human'", (int(feature),))
        return add_label(conn, feature, text, source="human", explainer=author)


def remove_human_label(conn: sqlite3.Connection, feature: int) -> int:
    """Delete the human label of `feature`; returns how many rows went."""
    _check_feature(conn, feature)
    with conn:
        return conn.execute("DELETE FROM labels WHERE feature = ? AND source = 'human'", (int(feature),)).rowcount


def _put_score(conn: sqlite3.Connection, label_id: int, score: float | None, scorer: str, n: int | None) -> None:
    now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    conn.execute(
        "INSERT OR REPLACE INTO scores (label_id, scorer, score, n, created) VALUES (?, ?, ?, ?, ?)",
        (int(label_id), scorer, score, n, now),
    )


def set_score(conn: sqlite3.Connection, label_id: int, score: float | None, scorer: str, n: int | None = None) -> None:
    """Record `scorer`'s score of a label: its (label, scorer) row in `scores` is written or replaced, and the
    label's `score`/`scorer` columns become this latest score (for human labels too; the text never changes)."""
    with conn:
        conn.execute("UPDATE labels SET score = ?, scorer = ? WHERE id = ?", (score, scorer, int(label_id)))
        _put_score(conn, label_id, score, scorer, n)


def labelled(conn: sqlite3.Connection, explainer: str) -> set[int]:
    """Features that already carry a machine label from `explainer`."""
    rows = conn.execute("SELECT DISTINCT feature FROM labels WHERE source = 'machine' AND explainer = ?", (explainer,))
    return {int(r[0]) for r in rows}


def labels_to_score(conn: sqlite3.Connection, source: str = "all", explainer: str | None = None,
                    features: list[int] | None = None) -> list[dict[str, Any]]:  # fmt: skip
    """Label rows (id, feature, text, source, explainer, score, scorer, scorers) selected for scoring."""
    where, params = [], []
    if source in ("human", "machine"):
        where.append("source = ?")
        params.append(source)
    if explainer:
        where.append("explainer = ?")
        params.append(explainer)
    if features is not None:
        where.append("feature IN (SELECT value FROM json_each(?))")
        import json

        params.append(json.dumps(features))
    clause = f"WHERE {' AND '.join(where)}" if where else ""
    rows = [dict(r) for r in conn.execute(
        f"SELECT id, feature, text, source, explainer, score, scorer FROM labels {clause} ORDER BY feature, id", params
    )]  # fmt: skip
    by_label = label_scores(conn, [r["id"] for r in rows])
    for r in rows:  # every scorer that has scored the label (schema v2; just `scorer` for a v1 file)
        names = {s["scorer"] for s in by_label.get(r["id"], [])}
        r["scorers"] = sorted(names | {r["scorer"]} if r["scorer"] else names)
    return rows


def feature_labels(conn: sqlite3.Connection, feature: int) -> list[dict[str, Any]]:
    """Every label of `feature`, human first, each with `scores`: every scorer's score of it."""
    rows = [dict(r) for r in conn.execute(
        "SELECT id, text, source, explainer, score, scorer, created FROM labels WHERE feature = ? "
        "ORDER BY source = 'human' DESC, created DESC, id DESC",
        (int(feature),),
    )]  # fmt: skip
    scores = label_scores(conn, [r["id"] for r in rows])
    for r in rows:
        r["scores"] = scores.get(r["id"], [])
    return rows
