"""Context in offline labels: syntax classes, runnable context parts (document, preceding text, next token), their
wording read back exactly, and planted features whose meaning lies in their context: the stats explainer names the
context, and the context label beats the token-list label on held-out examples while a context-free feature keeps
its token list."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from explain_helpers import synthetic_corpus, write_atlas
from lmscope.atlas import open_atlas
from lmscope.atlas.db.schema import SOURCES_DDL, SOURCES_TABLE
from lmscope.explain.evidence import AtlasEvidence
from lmscope.explain.rules import Rule, Seq, parse, render
from lmscope.explain.scorers import rule_score
from lmscope.explain.stats_explainer import StatsConfig, _Flat, explain_stats
from lmscope.explain.syntax import Annotated, classify_context, classify_syntax


def test_syntax_classes_for_code_and_prose() -> None:
    toks = ["def", " area", "(", "x", "):", "\n", "    ", "return", " Decimal", "(", "'", "INF", "'", ")", ".", "sqrt",
            "()", "\n", "The", " cat", " said", ' "', "hi", '"', " (", "see", ")", ".", " It", " ran"]  # fmt: skip
    syn = dict(zip(toks, classify_syntax(toks), strict=False))
    assert syn["def"] == "keyword" and syn[" area"] == "definition" and syn["x"] == "name"
    assert syn[" Decimal"] == "call" and syn["sqrt"] == "attribute" and syn["("] == "operator"
    assert syn["INF"] == "", "inside a string the code classes do not apply (the context kind says 'string')"
    assert syn["The"] == "sentence_start" and syn[" It"] == "sentence_start" and syn[" cat"] == ""
    assert syn["hi"] == "quoted" and syn["see"] == "parenthesised"
    assert classify_context(toks)[toks.index("INF")] == "string"


def test_an_unfinished_code_line_keeps_the_classes_read_before_it() -> None:
    toks = ["x", " =", " foo", "(", "1", ",", " \"\"\"", "doc"]
    assert classify_syntax(toks)[:4] == ["name", "operator", "call", "operator"]


_TEXT = st.text(alphabet=st.sampled_from(list("ab '\"\\()x_.\n")), min_size=1, max_size=6)


@settings(max_examples=150, deadline=None)
@given(tokens=st.frozensets(_TEXT, max_size=10), prev=st.frozensets(_TEXT, max_size=2),
       after=st.none() | _TEXT, anchor=st.none() | _TEXT, nxt=st.frozensets(_TEXT, max_size=2),
       source=st.frozensets(_TEXT, max_size=2), syntax=st.none() | st.sampled_from(["call", "quoted", "keyword"]),
       context=st.none() | st.sampled_from(["code", "string", "prose"]), near=st.booleans(),
       hedge=st.sampled_from(["", "mostly", "unclear, perhaps"]))  # fmt: skip
def test_every_rule_reads_back_from_its_wording(tokens: frozenset[str], prev: frozenset[str], after: str | None,
                                                anchor: str | None, nxt: frozenset[str], source: frozenset[str],
                                                syntax: str | None, context: str | None, near: bool,
                                                hedge: str) -> None:  # fmt: skip
    anchor = anchor.strip() or None if anchor else None
    rule = Rule(tokens, None, prev, context, 3 if near else None, syntax, after, anchor, nxt, source)
    if not rule.conditions():
        return
    assert parse(render(rule, hedge)) == rule, render(rule, hedge)


def test_conditions_look_around_the_window() -> None:
    ann = Annotated(["code"] * 3, ["", "", ""], ["a.py"] * 3, left=["import", " os", "\n", "x", " Decimal"],
                    right=[")"])  # fmt: skip
    toks = ["(", "'", "INF"]
    assert Rule(tokens=frozenset({"("}), after="x Decimal").match_all(toks, ann) == [True, False, False]
    assert Rule(tokens=frozenset({"INF"}), next=frozenset({")"})).match_all(toks, ann) == [False, False, True]
    assert Rule(tokens=frozenset({"INF"}), anchor="Decimal").match_all(toks, ann) == [False, False, True]
    assert Rule(tokens=frozenset({"INF"}), anchor="import").match_all(toks, ann) == [False] * 3, "a line break between"
    assert Rule(source=frozenset({"a.py"})).match_all(toks, ann) == [True] * 3
    assert Rule(source=frozenset({"b.py"})).match_all(toks, ann) == [False] * 3
    assert Rule(tokens=frozenset({"("}), prev=frozenset({" Decimal"})).match_all(toks, ann) == [True, False, False]


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_the_explainers_vectorized_masks_equal_the_rules_own_matching(seed: int) -> None:
    rng = np.random.default_rng(seed)
    words = [" a", " b", "(", ")", "\n", "x", "import", " c"]
    seqs, ys = [], []
    for _ in range(4):
        n = int(rng.integers(1, 8))
        toks = [str(rng.choice(words)) for _ in range(n)]
        ann = Annotated(classify_context(toks), classify_syntax(toks), [str(rng.choice(["a", "b"]))] * n,
                        left=[str(rng.choice(words)) for _ in range(int(rng.integers(0, 3)))],
                        right=[str(rng.choice(words))] if rng.random() < 0.5 else [])  # fmt: skip
        seqs.append((toks, Seq.of(toks, ann, int(rng.integers(0, 5)))))
        ys.append(np.zeros(n, dtype=np.int64))
    flat = _Flat([s for _, s in seqs], ys)
    pick = lambda: frozenset(str(w) for w in rng.choice(words, size=2))  # noqa: E731
    rules = [Rule(tokens=pick()), Rule(token_class="punct", next=pick()), Rule(prev=pick(), source=frozenset({"a"})),
             Rule(after=" a(" if rng.random() < 0.5 else "x"), Rule(anchor="import"), Rule(tokens=pick(), max_pos=3),
             Rule(context="code", syntax="operator"), Rule()]  # fmt: skip
    for r in rules:
        want = np.concatenate([r.match_all(toks, s.ann, s.start) for toks, s in seqs])
        assert flat.rule_mask(r).tolist() == want.tolist(), render(r)


# ------------------------------------------------------------------------------------------- planted atlas
N_CTX, C = 240, 40


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> AtlasEvidence:
    """Feature 0 fires on ' the' and ' a' only in the contexts of document 'court.txt' (every other context);
    feature 1 fires on ' sat' only before ' on', and its logit effects promote ' on'; feature 2 fires on ' dog'
    everywhere (no context to find); feature 3 fires on ' cat' only right after ' of the'."""
    vocab, toks = synthetic_corpus(N_CTX, C, seed=3)
    ids = {t: i for i, t in enumerate(vocab)}
    rng = np.random.default_rng(5)
    for c in range(N_CTX):  # plant ' of the cat' and ' sat on' / ' sat to' a few times in each context
        for _ in range(2):
            p = int(rng.integers(1, C - 4))
            toks[c, p : p + 3] = [ids[" of"], ids[" the"], ids[" cat"]]
        p = int(rng.integers(1, C - 2))
        toks[c, p : p + 2] = [ids[" sat"], ids[" on"] if rng.random() < 0.5 else ids[" to"]]
    court = np.arange(N_CTX) % 8 == 0  # few enough that the examples cover most of them (negatives are elsewhere)
    text = np.array(vocab, dtype=object)[toks]
    acts = np.zeros((N_CTX, C, 4), dtype=np.float32)
    strength = 1.0 + rng.random((N_CTX, C)).astype(np.float32)
    acts[..., 0] = np.where(np.isin(text, [" the", " a"]) & court[:, None], strength, 0.0)
    before_on = np.zeros_like(text, dtype=bool)
    before_on[:, :-1] = text[:, 1:] == " on"
    acts[..., 1] = np.where((text == " sat") & before_on, strength, 0.0)
    acts[..., 2] = np.where(text == " dog", strength, 0.0)
    after_of_the = np.zeros_like(before_on)
    after_of_the[:, 2:] = (text[:, :-2] == " of") & (text[:, 1:-1] == " the")
    acts[..., 3] = np.where((text == " cat") & after_of_the, strength, 0.0)
    acts[:, 0] = 0.0
    path = write_atlas(tmp_path_factory.mktemp("ctx") / "ctx.db", vocab, toks, acts, top_k=16, per_bin=6)
    import sqlite3

    conn = sqlite3.connect(path)
    with conn:
        conn.execute(SOURCES_DDL)
        conn.executemany(f"INSERT INTO {SOURCES_TABLE} VALUES (?, 0, ?)",
                         [(c, "court.txt" if court[c] else f"story{c}.txt") for c in range(N_CTX)])  # fmt: skip
        conn.execute("UPDATE features SET logits = ? WHERE id = 1",
                     (json.dumps({"positive": [[ids[" on"], 3.0], [ids[" in"], 1.0]], "negative": []}),))
    conn.close()
    return AtlasEvidence(open_atlas(path))


def _label(src: AtlasEvidence, f: int, cfg: StatsConfig | None = None) -> tuple[object, dict[str, float | None]]:
    ev = src.evidence(f)
    lab = explain_stats(ev, src.token_freq(), src.vocab, kinds=src.kinds, cfg=cfg, promoted=src.promoted(f))
    assert parse(lab.text) == lab.rule and parse(lab.token_text) == lab.token_rule
    held = {}
    for scorer in ("detection", "fuzzing"):
        held[scorer] = rule_score(scorer, lab.rule, ev, kinds=src.kinds).score
        held[f"{scorer}_tokens"] = rule_score(scorer, lab.token_rule, ev, kinds=src.kinds).score
    return lab, held


def test_a_feature_of_one_document_is_labelled_with_it_and_beats_its_token_list(src: AtlasEvidence) -> None:
    lab, held = _label(src, 0)
    assert lab.rule.source == frozenset({"court.txt"}) and "in the document 'court.txt'" in lab.text  # type: ignore[attr-defined]
    assert held["detection"] is not None and held["detection_tokens"] is not None
    assert held["detection"] >= 0.9 and held["detection"] > held["detection_tokens"] + 0.15


def test_a_feature_that_fires_before_what_it_promotes_says_so(src: AtlasEvidence) -> None:
    lab, held = _label(src, 1)
    assert lab.rule.next == frozenset({" on"}) and "before ' on'" in lab.text  # type: ignore[attr-defined]
    assert held["detection"] is not None and held["detection_tokens"] is not None
    assert held["detection"] >= 0.9 and held["detection"] > held["detection_tokens"] + 0.15
    assert lab.evidence["promoted"][:1] == [" on"]  # type: ignore[attr-defined]


def test_a_feature_after_a_phrase_names_the_phrase(src: AtlasEvidence) -> None:
    lab, held = _label(src, 3)
    rule = lab.rule  # type: ignore[attr-defined]
    assert rule.after == " of the" or rule.prev == frozenset({" the"}), lab.text  # type: ignore[attr-defined]
    assert held["detection"] is not None and held["detection_tokens"] is not None
    assert held["detection"] >= held["detection_tokens"]


def test_a_feature_without_context_keeps_its_token_list(src: AtlasEvidence) -> None:
    lab, _held = _label(src, 2)
    assert lab.rule == lab.token_rule == Rule(tokens=frozenset({" dog"}))  # type: ignore[attr-defined]
    assert lab.evidence["context_kept"] is False  # type: ignore[attr-defined]


def test_parts_can_be_switched_off(src: AtlasEvidence) -> None:
    lab, _ = _label(src, 0, StatsConfig(parts=()))
    assert lab.rule.extras() == 0  # type: ignore[attr-defined]


def test_an_atlas_built_from_named_documents_stores_where_each_context_came_from(tmp_path: Path) -> None:
    from atlas_helpers import make_tiny_atlas
    from lmscope.atlas.db import read

    _model, _d, corpus, out = make_tiny_atlas(tmp_path)
    conn = open_atlas(out)
    files = {p.name for p in corpus.iterdir()}
    runs = [read.context_sources(conn, c) for c in read.context_ids(conn)]
    assert all(r and r[0][0] == 0 for r in runs) and all(s < 32 for r in runs for s, _ in r)
    names = [n for r in runs for _s, n in r]
    assert set(names) <= files and len(set(names)) > 5, "packed contexts span several documents, each named"
    assert sum(len(r) > 1 for r in runs) > 0
    ev = AtlasEvidence(conn)
    w = ev.windows(ev.live_features()[0])[0]
    assert set(ev.kinds(w).sources) <= files
