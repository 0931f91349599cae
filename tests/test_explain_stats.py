"""The offline `stats` explainer and rule scorers on a planted atlas: a digit feature is named and scores > 0.8 on
held-out examples; random 'features' score near chance; labels are runnable rules; context kinds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from explain_helpers import planted_atlas
from lmscope.atlas import open_atlas
from lmscope.explain.evidence import AtlasEvidence
from lmscope.explain.rules import Rule, classify_context, parse, render
from lmscope.explain.scorers import balanced_accuracy, fuzz_items, rule_score
from lmscope.explain.stats_explainer import explain_stats

RANDOM = [1, 4, 5, 6, 7, 8, 9]


@pytest.fixture(scope="module")
def atlas(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return planted_atlas(tmp_path_factory.mktemp("explain") / "planted.db")


@pytest.fixture(scope="module")
def src(atlas: Path) -> AtlasEvidence:
    return AtlasEvidence(open_atlas(atlas))


def label_and_scores(src: AtlasEvidence, f: int) -> tuple[str, float, dict[str, float | None]]:
    ev = src.evidence(f)
    lab = explain_stats(ev, src.token_freq(), src.vocab, kinds=src.kinds)
    assert parse(lab.text) == lab.rule, "a stats label must read back as the rule that was scored"
    scores = {s: rule_score(s, lab.text, ev, kinds=src.kinds).score for s in ("detection", "fuzzing", "simulation")}
    return lab.text, lab.confidence, scores


def test_digit_feature_is_named_and_scores_high(src: AtlasEvidence) -> None:
    text, confidence, scores = label_and_scores(src, 0)
    assert "digit" in text and not text.startswith(("mostly", "sometimes", "unclear"))
    assert confidence > 0.9
    assert scores["detection"] is not None and scores["detection"] > 0.8
    assert scores["fuzzing"] is not None and scores["fuzzing"] > 0.9
    assert scores["simulation"] is not None and scores["simulation"] > 0.6


def test_token_feature_names_its_tokens(src: AtlasEvidence) -> None:
    text, confidence, scores = label_and_scores(src, 2)
    assert "' court'" in text and "' law'" in text and confidence > 0.9
    assert scores["fuzzing"] is not None and scores["fuzzing"] > 0.9


def test_random_features_score_near_chance_and_say_they_are_unsure(src: AtlasEvidence) -> None:
    det, fuzz, conf = [], [], []
    for f in RANDOM:
        text, confidence, scores = label_and_scores(src, f)
        assert text.startswith(("mostly", "sometimes", "unclear")), text
        det.append(scores["detection"])
        fuzz.append(scores["fuzzing"])
        conf.append(confidence)
    assert abs(float(np.mean(det)) - 0.5) < 0.1 and max(det) < 0.75
    assert abs(float(np.mean(fuzz)) - 0.5) < 0.15
    assert float(np.mean(conf)) < 0.5


def test_split_is_deterministic_disjoint_and_negatives_avoid_example_contexts(src: AtlasEvidence) -> None:
    a, b = src.evidence(0), src.evidence(0)
    key = [(w.context, w.start) for w in a.explain]
    assert key == [(w.context, w.start) for w in b.explain]
    assert [(w.context, w.start) for w in a.held_out_negatives] == [(w.context, w.start) for w in b.held_out_negatives]
    assert not set(key) & {(w.context, w.start) for w in a.held_out}
    assert {w.kind for w in a.explain} == {"top", "quantile"} == {w.kind for w in a.held_out}
    ctxs = {w.context for w in a.explain + a.held_out}
    assert all(w.context not in ctxs and w.act == 0 for w in a.explain_negatives + a.held_out_negatives)
    assert len(a.held_out_negatives) >= len(a.held_out)


def test_fuzzing_items_mark_as_many_wrong_tokens_as_right_ones(src: AtlasEvidence) -> None:
    from lmscope.explain.scorers import ScoreConfig

    items = fuzz_items(src.evidence(0), ScoreConfig())
    right = [(w, m) for w, m, y in items if y == 1]
    wrong = [(w, m) for w, m, y in items if y == 0]
    assert len(right) == len(wrong) > 0
    assert all((w.acts[m] > 0).all() for w, m in right) and all((w.acts[m] == 0).all() for w, m in wrong)


def test_dead_feature_and_unparseable_label(src: AtlasEvidence) -> None:
    ev = src.evidence(3)
    lab = explain_stats(ev, src.token_freq(), src.vocab)
    assert lab.text.startswith("unclear") and lab.confidence == 0.0
    assert rule_score("detection", "vibes of a summer afternoon", src.evidence(0)).score is None


@pytest.mark.parametrize(
    "rule",
    [
        Rule(token_class="digit"),
        Rule(tokens=frozenset({" court", " law"})),
        Rule(tokens=frozenset({"'", '"', "\n"}), context="string"),
        Rule(tokens=frozenset({" the"}), prev=frozenset({" of", " in"}), context="prose"),
        Rule(token_class="newline", context="code", max_pos=3),
        Rule(tokens=frozenset({" after"}), prev=frozenset({" in"})),
    ],
)
@pytest.mark.parametrize("hedge", ["", "mostly", "unclear, perhaps"])
def test_render_parse_round_trip(rule: Rule, hedge: str) -> None:
    assert parse(render(rule, hedge)) == rule


def test_parse_plain_human_labels() -> None:
    assert parse("digits") == Rule(token_class="digit")
    assert parse("Numbers inside code") == Rule(token_class="digit", context="code")
    assert parse("the token ' the' after ' of'") == Rule(tokens=frozenset({" the"}), prev=frozenset({" of"}))
    assert parse("legal language in general") is None


def test_context_kinds() -> None:
    toks = ["def", " f", "(", "x", "):", "\n", "    ", '"""', "Doc", " string", '"""', "\n", "    ", "y", " =",
            ' "', "abc", '"', "  ", "#", " note", "\n", "The", " cat", " sat", " on", " 42", " mats", " at",
            " https", "://", "x", ".org"]  # fmt: skip
    kinds = dict(zip(toks, classify_context(toks), strict=False))
    assert kinds["def"] == "code" and kinds["Doc"] == "docstring" and kinds["abc"] == "string"
    assert kinds[" note"] == "comment" and kinds[" cat"] == "prose" and kinds[" 42"] == "number"
    assert kinds["://"] == "url" and kinds[".org"] == "url"


def test_balanced_accuracy() -> None:
    assert balanced_accuracy([1, 1, 0, 0], [1, 1, 0, 0]) == 1.0
    assert balanced_accuracy([1, 1, 1, 0], [1, 1, 1, 1]) == 0.5
    assert balanced_accuracy([1, 0, 0, 0], [1, 0, 1, 0]) == pytest.approx((1 + 2 / 3) / 2)
