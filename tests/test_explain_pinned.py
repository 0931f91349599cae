"""The stats explainer's labels, confidences and held-out scores on a small code-and-prose atlas, pinned.

`tests/fixtures/explain-pinned/labels.json` was written by the per-feature explainer (evidence read one feature at a
time, each window annotated through `AtlasEvidence.kinds`, every rule counted on numpy masks) before the labelling
run was made fast (bulk evidence, one atlas-wide position table, bitset counting). The fast path must reproduce it
exactly, and so must the per-feature path that is still there for callers with their own `kinds` (checked against
each other on every feature). Regenerate only for a deliberate change of the explainer:
`python tests/test_explain_pinned.py --write`.
"""

from __future__ import annotations

import json
import re
import sqlite3
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from explain_helpers import write_atlas
from lmscope.atlas.db.schema import SOURCES_DDL, SOURCES_TABLE
from lmscope.explain.evidence import AtlasEvidence
from lmscope.explain.ops import ExplainError
from lmscope.explain.rules import Rule, parse, render

PINNED = Path(__file__).parent / "fixtures" / "explain-pinned" / "labels.json"

_TEXT = '''import os
from decimal import Decimal

# the default precision of the context
PRECISION = 28
URL = "https://docs.python.org/3/library/decimal.html"


def area(radius, scale=2):
    """Return the area of a circle of the given radius.

    The result is a Decimal, rounded to the context's precision (see the docs).
    """
    value = Decimal(radius) * Decimal(radius) * Decimal("3.14159")
    if scale > 1:
        value = value.quantize(Decimal("0.01"))  # two places
    return value


class Circle(object):
    """A circle with a radius and a name."""

    def __init__(self, radius, name="c"):
        self.radius = radius
        self.name = name

    def grow(self, by=1):
        self.radius = self.radius + by
        return self.radius


The court said that the law was clear. It ruled on 12 March 2019 that the house (and the land) was hers.
"The dog ran to the house," she said. The cat sat on the mat, and the dog sat on the floor.
In 1998 the court of appeal heard the case again; the law had changed by 2004, and the ruling stood.
for i in range(10):
    print(i, area(i), os.path.join("a", str(i)))
'''
N_CTX, CTX, N_FEAT = 96, 48, 28


def corpus() -> tuple[list[str], np.ndarray, list[list[tuple[int, str]]]]:
    """Contexts cut from the text above at seeded line starts (BOS first), with the document each part came from."""
    pieces = re.findall(r"\n[ ]*|[ ]?\w+|[ ]?[^\w\s]+|[ ]+", _TEXT)
    vocab = ["<s>", *sorted(set(pieces))]
    ids = {t: i for i, t in enumerate(vocab)}
    seq = [ids[p] for p in pieces]
    starts = [0] + [i + 1 for i, p in enumerate(pieces[:-1]) if p.startswith("\n")]
    rng = np.random.default_rng(11)
    toks = np.zeros((N_CTX, CTX), dtype=np.int64)
    sources = []
    for c in range(N_CTX):
        row: list[int] = [0]
        runs: list[tuple[int, str]] = []
        while len(row) < CTX:
            s = int(rng.choice(starts))
            runs.append((len(row), ("decimal.py", "court.txt", "circle.py")[min(2, s * 3 // len(seq))]))
            row += seq[s : s + int(rng.integers(8, 40))]
        toks[c] = row[:CTX]
        sources.append([r for r in runs if r[0] < CTX])
    return vocab, toks, sources


def activations(vocab: list[str], toks: np.ndarray) -> np.ndarray:
    """Features of many shapes: token sets, classes, what comes before or after, random ones, dense ones."""
    rng = np.random.default_rng(12)
    text = np.array(vocab, dtype=object)[toks]
    strip = np.vectorize(str.strip, otypes=[object])(text)
    prev = np.concatenate([np.full((N_CTX, 1), "", dtype=object), text[:, :-1]], axis=1)
    nxt = np.concatenate([text[:, 1:], np.full((N_CTX, 1), "", dtype=object)], axis=1)
    digit = np.vectorize(lambda t: t.strip().isdigit(), otypes=[bool])(text)
    newline = np.vectorize(lambda t: "\n" in t, otypes=[bool])(text)
    word = np.vectorize(lambda t: t.strip().isalpha(), otypes=[bool])(text)
    masks = [
        np.isin(strip, ["Decimal"]),
        np.isin(strip, ["the", "a"]),
        digit,
        newline,
        np.isin(strip, ["def", "class", "return", "if", "for", "import", "from"]),
        np.isin(strip, ["radius"]) & (prev == "."),
        np.isin(strip, ["self"]),
        (text == "(") | (text == "(\"") | np.isin(strip, ["(", "(\""]),
        np.isin(strip, ["court", "law", "ruling", "case"]),
        np.isin(strip, ["sat", "ran"]) & np.isin(nxt, [" on", " to"]),
        word & (prev == " the"),
        np.isin(strip, ["value", "radius", "scale"]),
        np.isin(strip, ["name", "radius"]) & np.isin(prev, ["."]),
        np.isin(text, [" =", " *", " +", " >"]),
        np.isin(strip, ["dog", "cat", "house", "mat"]),
        word & np.isin(prev, ["(", " ("]),
        np.vectorize(lambda t: t[:1].isupper() or t[1:2].isupper(), otypes=[bool])(text),
        np.isin(strip, ["precision", "context", "docs"]),
    ]
    acts = np.zeros((N_CTX, CTX, N_FEAT), dtype=np.float32)
    for f, m in enumerate(masks):
        keep = rng.random(m.shape) < 0.9
        acts[..., f] = np.where(m & keep, 1.0 + 3.0 * rng.random(m.shape), 0.0)
    for f in range(len(masks), N_FEAT):
        rate = 0.02 if f % 3 else 0.3  # some sparse random features, some dense ones
        acts[..., f] = np.where(rng.random((N_CTX, CTX)) < rate, rng.random((N_CTX, CTX)) * 2.0, 0.0)
    acts[..., N_FEAT - 1] = 0.0  # one dead feature
    acts[:, 0] = 0.0
    return acts


def build(path: Path) -> Path:
    vocab, toks, sources = corpus()
    write_atlas(path, vocab, toks, activations(vocab, toks), top_k=12, bins=4, per_bin=4, before=10, after=5)
    ids = {t: i for i, t in enumerate(vocab)}
    conn = sqlite3.connect(path)
    with conn:
        conn.execute(SOURCES_DDL)
        conn.executemany(f"INSERT INTO {SOURCES_TABLE} VALUES (?, ?, ?)",
                         [(c, s, n) for c, runs in enumerate(sources) for s, n in runs])  # fmt: skip
        for f, promoted in ((9, [" on", " to"]), (0, ["(", "(\""]), (5, [" =", " +"])):
            top = [[ids[t], 2.0 - 0.1 * k] for k, t in enumerate(promoted) if t in ids]
            logits = json.dumps({"positive": top, "negative": []})
            conn.execute("UPDATE features SET logits = ? WHERE id = ?", (logits, f))
        prov = {"model": {"spec": "synthetic"}, "dictionary": {}, "special_token_ids": [0]}
        conn.execute("UPDATE meta SET value = ? WHERE key = 'provenance'", (json.dumps(prov),))
    conn.close()
    return path


def labels_of(path: Path) -> list[dict[str, object]]:
    from lmscope.explain.pipeline import explain_atlas

    rep = explain_atlas(path, "stats", redo=True)
    return [{k: d[k] for k in ("feature", "label", "confidence", "score", "scorer")} for d in rep.done]


@pytest.fixture(scope="module")
def atlas(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build(tmp_path_factory.mktemp("pinned") / "atlas.db")


def test_the_labels_and_scores_are_the_pinned_ones(atlas: Path) -> None:
    want = json.loads(PINNED.read_text())
    got = labels_of(atlas)
    assert [d["feature"] for d in got] == [d["feature"] for d in want]
    for g, w in zip(got, want, strict=True):
        assert g == w, f"feature {w['feature']}"


@pytest.fixture(scope="module")
def src(atlas: Path) -> Iterator[AtlasEvidence]:
    from lmscope.atlas import open_atlas

    conn = open_atlas(atlas)
    yield AtlasEvidence(conn)
    conn.close()


def test_the_table_path_gives_the_per_window_path_s_labels_evidence_and_scores(src: AtlasEvidence) -> None:
    """explain_stats / rule_score reading the atlas-wide position table == annotating each window
    (AtlasEvidence.kinds), for every feature, with every part of the label and every scorer."""
    from lmscope.explain.scorers import rule_score
    from lmscope.explain.stats_explainer import explain_stats, text_frequencies

    table = src.positions()
    freq = text_frequencies(src.token_freq(), src.vocab)
    for ev in src.evidence_many(src.live_features()):
        prom = src.promoted(ev.feature)
        slow = explain_stats(ev, freq, src.vocab, kinds=src.kinds, promoted=prom)
        fast = explain_stats(ev, freq, src.vocab, kinds=src.kinds, promoted=prom, positions=table)
        assert fast == slow, ev.feature
        for scorer in ("detection", "fuzzing", "simulation"):
            for rule in (slow.rule, slow.token_rule, parse("digits in code"), parse("tokens after ' the'")):
                a = rule_score(scorer, rule, ev, kinds=src.kinds)
                b = rule_score(scorer, rule, ev, kinds=src.kinds, positions=table)
                assert a == b, (ev.feature, scorer, render(rule))


def test_evidence_read_in_bulk_is_the_evidence_read_one_feature_at_a_time(src: AtlasEvidence) -> None:
    feats = src.live_features()
    many = src.evidence_many(feats)
    for f, ev in zip(feats, many, strict=True):
        one = src.evidence(f)
        for a, b in ((one, ev),):
            assert (a.feature, a.max_act, a.density) == (b.feature, b.max_act, b.density)
            wins_a = a.explain + a.held_out + a.explain_negatives + a.held_out_negatives
            wins_b = b.explain + b.held_out + b.explain_negatives + b.held_out_negatives
            for wa, wb in zip(wins_a, wins_b, strict=True):
                assert (wa.context, wa.start, wa.token_ids, wa.tokens, wa.kind, wa.bin, wa.peak) == (
                    wb.context, wb.start, wb.token_ids, wb.tokens, wb.kind, wb.bin, wb.peak)  # fmt: skip
                assert wa.acts.tolist() == wb.acts.tolist()
    with pytest.raises(ExplainError, match="not in this atlas"):
        src.evidence_many([0, 10_000])


def test_the_conditions_read_from_the_table_are_rules_check_s(src: AtlasEvidence) -> None:
    """Every kind of condition, at every position of the atlas's contexts, from the table and from rules.check."""
    from lmscope.explain.flat import _Flat
    from lmscope.explain.rules import Seq

    table = src.positions()
    ev = src.evidence(4)
    wins = ev.explain + ev.explain_negatives + ev.held_out
    lens = np.array([len(w.tokens) for w in wins])
    idx = table.gather_many([w.context for w in wins], [w.start for w in wins], lens)
    fast = _Flat([], (np.zeros(len(idx), np.int64), lens), table=table, idx=idx)
    slow = _Flat([Seq.of(w.tokens, src.kinds(w), w.start) for w in wins], (np.zeros(len(idx), np.int64), lens))
    rules = [Rule(tokens=frozenset({" the", "self", " Decimal"})), Rule(token_class="newline"),
             Rule(prev=frozenset({".", None})), Rule(next=frozenset({"(", " ="})), Rule(after=" self."),
             Rule(after="def"), Rule(anchor="def"), Rule(anchor="self"), Rule(context="docstring"),
             Rule(context="code", syntax="call"), Rule(syntax="sentence_start"), Rule(source=frozenset({"court.txt"})),
             Rule(token_class="word_start", max_pos=5), Rule(tokens=frozenset({"nowhere"})), Rule()]  # fmt: skip
    for r in rules:
        assert fast.rule_mask(r).tolist() == slow.rule_mask(r).tolist(), render(r)
    for i in range(len(idx)):
        assert fast.line_words(i) == slow.line_words(i) and fast.after_texts(i) == slow.after_texts(i)


def test_several_workers_write_the_labels_of_one(atlas: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    from lmscope.explain import stats_run
    from lmscope.explain.pipeline import explain_atlas

    monkeypatch.setattr(stats_run, "STATS_CHUNK", 3)  # 27 features: 9 chunks, so two workers get several each
    one, two = tmp_path / "one.db", tmp_path / "two.db"
    shutil.copy(atlas, one)
    shutil.copy(atlas, two)
    a = explain_atlas(one, workers=1, redo=True).done
    b = explain_atlas(two, workers=2, redo=True).done
    assert a == b and len(a) == N_FEAT - 1
    rows = "SELECT feature, text, score, scorer, source, explainer FROM labels ORDER BY feature"
    assert sqlite3.connect(one).execute(rows).fetchall() == sqlite3.connect(two).execute(rows).fetchall()


def test_median_is_numpy_s() -> None:
    from lmscope.explain.evidence import median

    rng = np.random.default_rng(0)
    for n in range(1, 40):
        x = rng.integers(-5, 100, size=n)
        assert median(x) == median(x.tolist()) == float(np.median(x))


if __name__ == "__main__" and "--write" in sys.argv:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        out = labels_of(build(Path(d) / "atlas.db"))
    PINNED.parent.mkdir(parents=True, exist_ok=True)
    PINNED.write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {len(out)} labels to {PINNED}")
