"""Labels and their scores in an atlas: the `labels` table (the FTS `search` index follows by trigger) and, from
schema version 2, the `scores` table (one row per label and scorer; deleting a label deletes its scores).

Readers here treat a version-1 file read as it is (no `scores` table) as having no per-scorer scores. Each
writer that changes more than one row does it in one transaction. What a label may say, and which labels may
replace which, is decided by the callers (lmscope.explain.labels).
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence
from typing import Any

from lmscope.atlas.db.schema import AtlasError, Connection, has_table

LABEL_COLUMNS = "id, text, source, explainer, score, scorer, created"


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def _ids_json(ids: list[int]) -> str:
    return json.dumps([int(i) for i in ids])


# ---------------------------------------------------------------------------------------------------- reading
def label_scores(conn: Connection, label_ids: list[int]) -> dict[int, list[dict[str, Any]]]:
    """Every scorer's score of each label (by scorer name); empty for a version-1 file read as it is."""
    if not label_ids or not has_table(conn, "scores"):
        return {}
    rows = conn.execute(
        "SELECT label_id, scorer, score, n, created FROM scores WHERE label_id IN (SELECT value FROM json_each(?)) "
        "ORDER BY label_id, scorer",
        (_ids_json(label_ids),),
    )
    out: dict[int, list[dict[str, Any]]] = {}
    for r in rows:
        out.setdefault(int(r["label_id"]), []).append(
            {"scorer": r["scorer"], "score": r["score"], "n": r["n"], "created": r["created"]}
        )
    return out


def shown_labels(conn: Connection, features: list[int]) -> dict[int, dict[str, Any]]:
    """The label shown for each feature: the newest human label, else the best-scored machine label; with its
    (latest) score, the scorer that gave it, and the explainer that wrote it (a human's author)."""
    if not features:
        return {}
    rows = conn.execute(
        "SELECT feature, text, source, score, explainer, scorer FROM labels WHERE feature IN "
        "(SELECT value FROM json_each(?)) ORDER BY feature, source = 'human' DESC, "
        "CASE WHEN source = 'human' THEN created END DESC, CASE WHEN source = 'human' THEN id END DESC, "
        "score DESC",
        (json.dumps(features),),
    )
    out: dict[int, dict[str, Any]] = {}
    for r in rows:
        out.setdefault(r["feature"], {"text": r["text"], "source": r["source"], "score": r["score"],
                                      "explainer": r["explainer"], "scorer": r["scorer"]})  # fmt: skip
    return out


def feature_labels(conn: Connection, feature: int) -> list[dict[str, Any]]:
    """Every label of `feature`, human first then newest first, each with `scores`: every scorer's score of it."""
    rows = [dict(r) for r in conn.execute(
        f"SELECT {LABEL_COLUMNS} FROM labels WHERE feature = ? ORDER BY source = 'human' DESC, created DESC, id DESC",
        (int(feature),),
    )]  # fmt: skip
    scores = label_scores(conn, [r["id"] for r in rows])
    for r in rows:
        r["scores"] = scores.get(r["id"], [])
    return rows


def machine_labelled(conn: Connection, explainer: str) -> set[int]:
    """Features that carry a machine label from `explainer`."""
    rows = conn.execute("SELECT DISTINCT feature FROM labels WHERE source = 'machine' AND explainer = ?", (explainer,))
    return {int(r[0]) for r in rows}


def count_machine_labelled(conn: Connection, explainer_prefix: str) -> int:
    """How many features carry a machine label from an explainer whose name starts with `explainer_prefix`."""
    row = conn.execute(
        "SELECT count(DISTINCT feature) FROM labels WHERE source = 'machine' AND explainer LIKE ? || '%'",
        (explainer_prefix,),
    ).fetchone()
    return int(row[0])


def labels_for_scoring(conn: Connection, source: str = "all", explainer: str | None = None,
                       features: list[int] | None = None) -> list[dict[str, Any]]:  # fmt: skip
    """Label rows (id, feature, text, source, explainer, score, scorer, scorers), by feature then id: those of
    `source` (human, machine, or all), of `explainer` if given, of `features` if given. `scorers` names every
    scorer that has scored the label (schema v2; just `scorer` for a version-1 file)."""
    where: list[str] = []
    params: list[Any] = []
    if source in ("human", "machine"):
        where.append("source = ?")
        params.append(source)
    if explainer:
        where.append("explainer = ?")
        params.append(explainer)
    if features is not None:
        where.append("feature IN (SELECT value FROM json_each(?))")
        params.append(json.dumps(features))
    clause = f"WHERE {' AND '.join(where)}" if where else ""
    rows = [dict(r) for r in conn.execute(
        f"SELECT id, feature, text, source, explainer, score, scorer FROM labels {clause} ORDER BY feature, id", params
    )]  # fmt: skip
    by_label = label_scores(conn, [r["id"] for r in rows])
    for r in rows:
        names = {s["scorer"] for s in by_label.get(r["id"], [])}
        r["scorers"] = sorted(names | {r["scorer"]} if r["scorer"] else names)
    return rows


def best_scored_machine_labels(conn: Connection, scorer: str, second_scorer: str,
                               limit: int = 500) -> list[tuple[Any, ...]]:  # fmt: skip
    """Machine labels that `scorer` has scored, best first (ties: `second_scorer`'s score, then the denser
    feature): (feature, text, score, second score or None, the feature's max activation)."""
    rows = conn.execute(
        """SELECT l.feature, l.text, d.score, z.score, f.max_act FROM labels l
           JOIN features f ON f.id = l.feature
           JOIN scores d ON d.label_id = l.id AND d.scorer = ?
           LEFT JOIN scores z ON z.label_id = l.id AND z.scorer = ?
           WHERE l.source = 'machine' ORDER BY d.score DESC, coalesce(z.score, 0) DESC, f.density DESC
           LIMIT ?""",
        (scorer, second_scorer, int(limit)),
    )
    return [tuple(r) for r in rows]


# ---------------------------------------------------------------------------------------------------- writing
def add_label(
    conn: Connection,
    feature: int,
    text: str,
    source: str = "human",
    explainer: str | None = None,
    score: float | None = None,
    scorer: str | None = None,
    created: str | None = None,
) -> int:
    """Insert a label (the `search` index follows through a trigger); returns its id. A score with a scorer
    is also recorded as that scorer's row in `scores` (schema v2). Text with a NUL character is refused (the
    full-text index would cut it there, and no reader expects one)."""
    if source not in ("human", "machine"):
        raise AtlasError(f"label source must be 'human' or 'machine', got {source!r}")
    if "\x00" in text:
        raise AtlasError("the label contains a NUL character (\\x00); remove it")
    created = created or _now()
    cur = conn.execute(
        "INSERT INTO labels (feature, text, source, explainer, score, scorer, created) VALUES (?, ?, ?, ?, ?, ?, ?)",
        (int(feature), text, source, explainer, score, scorer, created),
    )
    lid = int(cur.lastrowid or 0)
    if score is not None and scorer and has_table(conn, "scores"):
        conn.execute(
            "INSERT OR REPLACE INTO scores (label_id, scorer, score, n, created) VALUES (?, ?, ?, NULL, ?)",
            (lid, scorer, score, created),
        )
    return lid


def replace_machine_label(conn: Connection, feature: int, text: str, explainer: str,
                          score: float | None = None, scorer: str | None = None) -> int:  # fmt: skip
    """In one transaction, delete `explainer`'s machine labels of `feature` and add this one; returns its id."""
    with conn:
        conn.execute("DELETE FROM labels WHERE feature = ? AND source = 'machine' AND explainer = ?",
                     (int(feature), explainer))  # fmt: skip
        return add_label(conn, feature, text, source="machine", explainer=explainer, score=score, scorer=scorer)


def replace_machine_labels(conn: Connection, rows: Sequence[tuple[int, str, float | None, str | None]],
                           explainer: str) -> list[int]:  # fmt: skip
    """`replace_machine_label` for each (feature, text, score, scorer), all in one transaction (one commit, one sync
    to disk, for many labels); returns the new ids."""
    ids = []
    with conn:
        for feature, text, score, scorer in rows:
            conn.execute("DELETE FROM labels WHERE feature = ? AND source = 'machine' AND explainer = ?",
                         (int(feature), explainer))  # fmt: skip
            ids.append(add_label(conn, feature, text, source="machine", explainer=explainer, score=score,
                                 scorer=scorer))  # fmt: skip
    return ids


def set_scores(conn: Connection, rows: Sequence[tuple[int, float | None]], scorer: str) -> None:
    """`set_score` for each (label id, score), all in one transaction."""
    with conn:
        for label_id, score in rows:
            conn.execute("UPDATE labels SET score = ?, scorer = ? WHERE id = ?", (score, scorer, int(label_id)))
            put_score(conn, label_id, score, scorer, None)


def replace_human_label(conn: Connection, feature: int, text: str, author: str | None = None) -> int:
    """In one transaction, delete the human labels of `feature` and add this one; returns its id."""
    with conn:
        conn.execute("DELETE FROM labels WHERE feature = ? AND source = 'human'", (int(feature),))
        return add_label(conn, feature, text, source="human", explainer=author)


def delete_human_labels(conn: Connection, feature: int) -> int:
    """Delete the human labels of `feature`; returns how many rows went."""
    with conn:
        return int(conn.execute("DELETE FROM labels WHERE feature = ? AND source = 'human'", (int(feature),)).rowcount)


def put_score(conn: Connection, label_id: int, score: float | None, scorer: str, n: int | None) -> None:
    """Write or replace `scorer`'s row in `scores` for a label (inside the caller's transaction)."""
    conn.execute(
        "INSERT OR REPLACE INTO scores (label_id, scorer, score, n, created) VALUES (?, ?, ?, ?, ?)",
        (int(label_id), scorer, score, n, _now()),
    )


def set_score(conn: Connection, label_id: int, score: float | None, scorer: str, n: int | None = None) -> None:
    """Record `scorer`'s score of a label in one transaction: its (label, scorer) row in `scores` is written or
    replaced, and the label's `score`/`scorer` columns become this latest score (the text never changes)."""
    with conn:
        conn.execute("UPDATE labels SET score = ?, scorer = ? WHERE id = ?", (score, scorer, int(label_id)))
        put_score(conn, label_id, score, scorer, n)
