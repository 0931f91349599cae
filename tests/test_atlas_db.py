"""The atlas access layer (lmscope.atlas.db): all SQL lives there, and it reads back what it writes.

The scan below reads every module of src/lmscope outside lmscope/atlas/db: none may call `.execute(`,
`.executemany(` or `.executescript(`, import `sqlite3`, or hold an SQL statement in a string.
"""

from __future__ import annotations

import ast
import itertools
import re
from pathlib import Path

import numpy as np
import pytest

import lmscope
from atlas_helpers import CFG, make_corpus, tiny_dictionary
from lmscope.atlas import build_atlas
from lmscope.atlas.db import labels as db_labels
from lmscope.atlas.db import read
from lmscope.atlas.db import write as db_write
from lmscope.atlas.db.read import FeatureQuery
from lmscope.atlas.db.schema import (
    SCHEMA_VERSION,
    DbError,
    create,
    get_meta,
    is_complete,
    open_atlas,
    open_for_writing,
)
from lmscope.core.progress import ProgressEvent
from tiny_models import save_tiny_with_tokenizer

SRC = Path(__file__).resolve().parent.parent / "src" / "lmscope"
ACCESS_LAYER = SRC / "atlas" / "db"
EXECUTE = {"execute", "executemany", "executescript"}
# Modules whose strings hold SQL as *text*, never run: the audit's insecure-code battery (SQL built by concatenation
# is the very example it must show). Their driver calls and sqlite3 imports are still checked.
SQL_AS_DATA = {SRC / "audit" / "batteries.py"}
SQL = re.compile(
    r"\b(SELECT\s[^\n]*\bFROM\b|INSERT\s+(OR\s+\w+\s+)?INTO\b|DELETE\s+FROM\b|UPDATE\s+\w+\s+SET\b|"
    r"CREATE\s+(TABLE|INDEX|TRIGGER|VIRTUAL\s+TABLE)\b|DROP\s+(TABLE|INDEX|TRIGGER)\b|PRAGMA\s+\w+)"
)


def sql_in(path: Path) -> list[str]:
    """Where a module talks SQL: driver calls, a sqlite3 import, or an SQL statement in a string."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in EXECUTE:
            out.append(f"{path}:{node.lineno} calls .{node.func.attr}(")
        elif isinstance(node, ast.Import) and any(a.name.split(".")[0] == "sqlite3" for a in node.names):
            out.append(f"{path}:{node.lineno} imports sqlite3")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "sqlite3":
            out.append(f"{path}:{node.lineno} imports from sqlite3")
        elif (isinstance(node, ast.Constant) and isinstance(node.value, str) and SQL.search(node.value)
              and path not in SQL_AS_DATA):  # fmt: skip
            out.append(f"{path}:{node.lineno} holds SQL: {SQL.search(node.value).group(0)!r}")  # type: ignore[union-attr]
    return out


def test_no_sql_outside_the_access_layer() -> None:
    modules = [p for p in sorted(SRC.rglob("*.py")) if ACCESS_LAYER not in p.parents]
    assert len(modules) > 20
    bad = [hit for p in modules for hit in sql_in(p)]
    assert not bad, "SQL outside lmscope/atlas/db (add a function to the access layer and call it):\n" + "\n".join(bad)


def test_the_access_layer_is_where_the_sql_is() -> None:
    assert sql_in(ACCESS_LAYER / "schema.py") and sql_in(ACCESS_LAYER / "read.py")


@pytest.mark.parametrize(
    "source",
    [
        "def f(conn):\n    return conn.execute('x')\n",
        "def f(c):\n    c.executemany('x', [])\n",
        "import sqlite3\n",
        "from sqlite3 import connect\n",
        "Q = 'SELECT id FROM features WHERE dead = 0'\n",
        "Q = '''INSERT OR REPLACE INTO meta (key) VALUES (?)'''\n",
        "Q = 'UPDATE labels SET score = 1'\n",
    ],
)
def test_the_scan_sees_sql(tmp_path: Path, source: str) -> None:
    f = tmp_path / "m.py"
    f.write_text(source)
    assert sql_in(f)


def test_the_scan_leaves_prose_alone(tmp_path: Path) -> None:
    f = tmp_path / "m.py"
    f.write_text('"""Select the features; delete the label from the list; update the score."""\n')
    assert sql_in(f) == []


# ------------------------------------------------------------------------------------------ a tiny hand-made atlas
VOCAB = ["<s>", "Paris", " is", " a", " city", "1", "2", "x"]
CONTEXTS = np.array([[0, 1, 2, 3, 4], [0, 5, 6, 5, 6], [0, 7, 7, 7, 7]], dtype=np.int64)  # context 2 unused


def feature(fid: int, n_fired: int, density: float, max_act: float, logits: str | None = None) -> tuple:
    dead = int(n_fired == 0)
    mean = max_act / 2 if n_fired else 0.0
    return (fid, n_fired, density, mean, max_act, dead, '{"width": 1.0, "counts": [1]}', logits, "[]", "[]")


def example(f: int, kind: str, b: int, rank: int, ctx: int, pos: int, act: float, text: str) -> tuple:
    acts = np.array([0.0, act], dtype="<f4").tobytes()
    return (f, kind, b, rank, ctx, pos, act, pos - 1, acts, int(CONTEXTS[ctx, pos]), text)


@pytest.fixture
def atlas(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.db"
    conn = create(path)
    assert not is_complete(path)  # meta.complete is 0 until the build's last transaction
    db_write.insert_contexts(conn, 0, CONTEXTS[:2])
    db_write.insert_contexts(conn, 2, CONTEXTS[2:])
    db_write.commit(conn)
    logits = '{"positive": [[1, 2.0]], "negative": [[7, -1.0]]}'
    features = [feature(0, 10, 0.01, 5.0, logits), feature(1, 4, 0.004, 2.0, logits), feature(2, 0, 0.0, 0.0)]
    examples = [
        example(0, "top", -1, 0, 0, 1, 5.0, "Paris is"),
        example(0, "top", -1, 1, 0, 4, 3.0, "a city"),
        example(0, "quantile", 0, 0, 0, 4, 1.0, "a city"),
        example(0, "quantile", 1, 0, 1, 1, 4.0, "12"),
        example(1, "top", -1, 0, 1, 2, 2.0, "12"),
    ]
    bins = [(0, 0, 0.0, 2.5, 7), (0, 1, 2.5, 5.0, 3)]
    db_write.write_build(conn, VOCAB, features, examples, bins, {"summary": {"d_sae": 3}})
    db_write.compact(conn)
    conn.close()
    return path


def test_write_then_read_back(atlas: Path) -> None:
    assert is_complete(atlas)
    conn = open_atlas(atlas)
    assert get_meta(conn, "schema_version") == SCHEMA_VERSION and get_meta(conn, "summary") == {"d_sae": 3}
    assert read.vocab_texts(conn) == VOCAB
    assert read.count_features(conn) == 3 and read.feature_counts(conn) == (3, 2)
    assert read.has_feature(conn, 2) and not read.has_feature(conn, 3)
    assert read.live_feature_ids(conn) == [0, 1]
    assert read.max_acts(conn, [1, 0, 9]) == {0: 5.0, 1: 2.0} and read.max_acts(conn, []) == {}
    assert read.feature_max_density(conn, 1) == (2.0, 0.004) and read.feature_max_density(conn, 9) is None
    assert read.feature_row(conn, 0)["mean_act"] == 2.5 and read.feature_row(conn, 9) is None  # type: ignore[index]
    assert sorted(read.densities(conn)) == [0.0, 0.004, 0.01]
    # contexts no example refers to were dropped at the end of the build
    assert read.context_ids(conn) == [0, 1]
    assert read.context_tokens(conn, 1).tolist() == CONTEXTS[1].tolist()  # type: ignore[union-attr]
    assert read.context_tokens(conn, 2) is None
    assert {cid: t.tolist() for cid, t in read.iter_contexts(conn)} == {i: CONTEXTS[i].tolist() for i in (0, 1)}
    # examples: top first, then quantile bins (windows: highest bin first; with contexts: lowest first)
    assert [(k, b, r) for k, b, r, *_ in read.example_windows(conn, 0)] == [
        ("top", -1, 0), ("top", -1, 1), ("quantile", 1, 0), ("quantile", 0, 0)
    ]  # fmt: skip
    rows = read.examples_with_contexts(conn, 0)
    assert [(r["kind"], r["bin"]) for r in rows] == [("top", -1), ("top", -1), ("quantile", 0), ("quantile", 1)]
    assert np.frombuffer(rows[0]["ctx"], "<i4").tolist() == CONTEXTS[0].tolist() and rows[0]["peak_token"] == 1
    assert [(b["bin"], b["count"]) for b in read.quantile_bins(conn, 0)] == [(1, 3), (0, 7)]
    # search: the top examples' text is in the full-text index, and FTS syntax in a query is inert
    assert read.features_matching(conn, "a city", "example", 10) == [0]
    assert read.features_matching(conn, "12", "example", 10) == [1]
    assert read.features_matching(conn, 'Paris OR "12', "example", 10) == []
    assert read.features_peaking_on(conn, [6], 10) == [1] and read.features_peaking_on(conn, [1, 6], 10) == [0, 1]
    conn.close()


def test_feature_page_filters_sorts_and_keeps_search_order(atlas: Path) -> None:
    conn = open_atlas(atlas)
    total, rows = read.feature_page(conn, FeatureQuery(sort="max_act", order="desc", dead=False))
    assert total == 2 and [r["id"] for r in rows] == [0, 1]
    total, rows = read.feature_page(conn, FeatureQuery(min_density=0.005, limit=1))
    assert total == 1 and [r["id"] for r in rows] == [0]
    total, rows = read.feature_page(conn, FeatureQuery(sort="relevance"), candidates=[2, 0])
    assert total == 2 and [r["id"] for r in rows] == [2, 0]
    assert read.feature_page(conn, FeatureQuery(sort="id; DROP TABLE features"))[0] == 3  # unknown sort: by id
    assert [r[0] for r in read.strong_features(conn, 5, min_density=1e-4, max_density=0.05)] == [0, 1]
    conn.close()


def test_labels_and_scores(atlas: Path) -> None:
    conn = open_for_writing(atlas)
    m1 = db_labels.replace_machine_label(conn, 0, "place names", "stats", score=0.7, scorer="rule-detection")
    db_labels.replace_machine_label(conn, 0, "cities", "other", score=0.9, scorer="rule-detection")
    m2 = db_labels.replace_machine_label(conn, 0, "capital cities", "stats", score=0.8, scorer="rule-detection")
    assert m2 != m1 and db_labels.label_scores(conn, [m1]) == {}  # the explainer's old label and its scores went
    assert {lab["text"] for lab in db_labels.feature_labels(conn, 0)} == {"capital cities", "cities"}
    assert db_labels.shown_labels(conn, [0])[0]["text"] == "cities"  # best-scored machine label
    h = db_labels.replace_human_label(conn, 0, "Paris", author="ann")
    db_labels.replace_human_label(conn, 0, "French capital", author="ann")
    shown = db_labels.shown_labels(conn, [0, 1])
    assert shown == {0: {"text": "French capital", "source": "human", "score": None, "explainer": "ann",
                         "scorer": None}}  # fmt: skip
    assert db_labels.feature_labels(conn, 0)[0]["text"] == "French capital"  # human first
    assert db_labels.label_scores(conn, [h]) == {}  # replaced, and a human label has no score yet
    db_labels.set_score(conn, m2, 0.6, "rule-fuzzing", n=12)
    by_scorer = {s["scorer"]: s for s in db_labels.label_scores(conn, [m2])[m2]}
    assert by_scorer["rule-detection"]["score"] == 0.8 and by_scorer["rule-fuzzing"]["n"] == 12
    rows = db_labels.labels_for_scoring(conn, source="machine", explainer="stats")
    assert [(r["id"], r["score"], r["scorers"]) for r in rows] == [(m2, 0.6, ["rule-detection", "rule-fuzzing"])]
    assert db_labels.machine_labelled(conn, "stats") == {0} and db_labels.count_machine_labelled(conn, "stat") == 1
    best = db_labels.best_scored_machine_labels(conn, "rule-detection", "rule-fuzzing")
    assert [(f, text, d, z) for f, text, d, z, _ in best] == [(0, "cities", 0.9, None), (0, "capital cities", 0.8, 0.6)]
    assert read.features_matching(conn, "French", "label", 10) == [0]  # the index follows the labels
    assert db_labels.delete_human_labels(conn, 0) == 1 and db_labels.delete_human_labels(conn, 0) == 0
    assert read.features_matching(conn, "French", "label", 10) == []
    conn.close()


def test_a_read_only_connection_cannot_write(atlas: Path) -> None:
    conn = open_atlas(atlas, readonly=True)
    with pytest.raises(DbError):
        db_labels.add_label(conn, 0, "nope")
    conn.close()


def test_the_build_reports_progress_through_the_callback(tmp_path: Path) -> None:
    model_dir = save_tiny_with_tokenizer("llama", str(tmp_path / "model"))
    model = lmscope.load_model(model_dir, device="cpu", dtype="float32")
    events: list[ProgressEvent] = []
    out = build_atlas(model, tiny_dictionary(), str(make_corpus(tmp_path / "corpus")), out=tmp_path / "a.db",
                      config=CFG, progress=events.append)  # fmt: skip
    assert is_complete(out)
    assert {(e.task, e.unit, e.total) for e in events} == {("atlas", "tokens", CFG.tokens)}
    assert events[0].done == 0 and [e.finished for e in events].count(True) == 1 and events[-1].finished
    assert events[-1].done == CFG.tokens and all(a.done <= b.done for a, b in itertools.pairwise(events))
