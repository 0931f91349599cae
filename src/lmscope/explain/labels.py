"""Which labels an atlas keeps (the rows themselves are read and written by lmscope.atlas.db.labels).

- A machine label replaces the same explainer's previous machine label for that feature, and nothing else.
- A human label replaces the feature's previous human label; machines never touch human rows.
- Features that already carry a machine label from an explainer are skipped when it runs again (resumable).
- Scores (schema v2): one `scores` row per (label, scorer), replaced when that scorer runs again; the label's
  own `score`/`scorer` columns keep the latest one (what v1 readers and the list views show). Deleting a
  label deletes its scores (trigger).
Every write is one transaction.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lmscope.atlas.db import labels as db_labels
from lmscope.atlas.db import read
from lmscope.atlas.db.schema import Connection, open_for_writing
from lmscope.explain.ops import ExplainError

MAX_LABEL_CHARS = 500

__all__ = [
    "MAX_LABEL_CHARS",
    "feature_labels",
    "labelled",
    "labels_to_score",
    "open_rw",
    "remove_human_label",
    "set_human_label",
    "set_score",
    "set_scores",
    "write_machine_label",
    "write_machine_labels",
]


def open_rw(path: str | Path, migrate: bool = True) -> Connection:
    """The atlas opened for writing (a running explorer keeps reading it: the file is in WAL mode). A version-1
    file is migrated to the current schema first, unless `migrate` is False (the explorer's human-label
    routes, which touch only the `labels` table)."""
    return open_for_writing(path, migrate=migrate)


def _check_feature(conn: Connection, feature: int) -> None:
    if not read.has_feature(conn, feature):
        n = read.count_features(conn)
        raise ExplainError(f"feature {feature} is not in this atlas; features run from 0 to {n - 1}")


def _controls(text: str) -> list[str]:
    return sorted({c for c in text if unicodedata.category(c) == "Cc"})


def _check_text(text: str) -> str:
    """The label with its whitespace collapsed; ExplainError if it is empty, too long, or holds a control
    character (NUL and the like, which collapsing whitespace leaves in place)."""
    text = " ".join(text.split())
    bad = _controls(text)
    if bad:
        names = ", ".join("NUL (\\x00)" if c == "\x00" else f"\\x{ord(c):02x}" for c in bad)
        raise ExplainError(f"the label contains a control character: {names}; remove it")
    if not text:
        raise ExplainError("the label is empty; give a short description of what the feature fires on")
    if len(text) > MAX_LABEL_CHARS:
        raise ExplainError(f"the label is {len(text)} characters; keep it under {MAX_LABEL_CHARS}")
    return text


def _visible_controls(text: str) -> str:
    """Control characters written as escapes (NUL as the four characters \\x00): a machine label quotes token
    text, which may hold them, and one such token must not stop a labelling run."""
    for c in _controls(text):
        text = text.replace(c, f"\\x{ord(c):02x}")
    return text


def _machine_text(text: str) -> str:
    escaped = _visible_controls(" ".join(text.split()))
    return _check_text(escaped if escaped == " ".join(text.split()) else escaped[:MAX_LABEL_CHARS])


def write_machine_label(conn: Connection, feature: int, text: str, explainer: str,
                        score: float | None = None, scorer: str | None = None) -> int:  # fmt: skip
    """Replace `explainer`'s machine label of `feature`; returns the new label id. Control characters in `text`
    are written as visible escapes (a human label holding one is refused instead)."""
    _check_feature(conn, feature)
    return db_labels.replace_machine_label(conn, feature, _machine_text(text), explainer, score=score, scorer=scorer)


def write_machine_labels(conn: Connection, rows: list[tuple[int, str, float | None, str | None]],
                         explainer: str) -> list[int]:  # fmt: skip
    """`write_machine_label` for each (feature, text, score, scorer), all in one transaction: one commit (and one
    sync to disk) for many labels. Every row is checked before anything is written; returns the new label ids."""
    checked = []
    for feature, text, score, scorer in rows:
        _check_feature(conn, feature)
        checked.append((int(feature), _machine_text(text), score, scorer))
    return db_labels.replace_machine_labels(conn, checked, explainer)


def set_human_label(conn: Connection, feature: int, text: str, author: str | None = None) -> int:
    """Set (or correct) the human label of `feature`; machine labels stay as they are. Returns the label id."""
    _check_feature(conn, feature)
    text = _check_text(text)
    return db_labels.replace_human_label(conn, feature, text, author=author)


def remove_human_label(conn: Connection, feature: int) -> int:
    """Delete the human label of `feature`; returns how many rows went."""
    _check_feature(conn, feature)
    return db_labels.delete_human_labels(conn, feature)


def set_score(conn: Connection, label_id: int, score: float | None, scorer: str, n: int | None = None) -> None:
    """Record `scorer`'s score of a label: its (label, scorer) row in `scores` is written or replaced, and the
    label's `score`/`scorer` columns become this latest score (for human labels too; the text never changes)."""
    db_labels.set_score(conn, label_id, score, scorer, n)


def set_scores(conn: Connection, rows: Sequence[tuple[int, float | None]], scorer: str) -> None:
    """`set_score` for each (label id, score), all in one transaction."""
    if rows:
        db_labels.set_scores(conn, rows, scorer)


def labelled(conn: Connection, explainer: str) -> set[int]:
    """Features that already carry a machine label from `explainer`."""
    return db_labels.machine_labelled(conn, explainer)


def labels_to_score(conn: Connection, source: str = "all", explainer: str | None = None,
                    features: list[int] | None = None) -> list[dict[str, Any]]:  # fmt: skip
    """Label rows (id, feature, text, source, explainer, score, scorer, scorers) selected for scoring."""
    return db_labels.labels_for_scoring(conn, source, explainer, features)


def feature_labels(conn: Connection, feature: int) -> list[dict[str, Any]]:
    """Every label of `feature`, human first, each with `scores`: every scorer's score of it."""
    return db_labels.feature_labels(conn, feature)
