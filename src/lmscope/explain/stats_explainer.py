"""The `stats` explainer: an offline label built from evidence, with no language model.

It looks at the tokens where the feature fires in the explain half of its examples (activation >= half the
window's peak) and searches a small space of runnable rules (see rules.py): sets of the most frequent firing
tokens (ranked by count and by enrichment over their corpus frequency), token classes (digits, punctuation, line
breaks, capitalized words ...), each optionally narrowed by the previous token, the context kind (string,
comment, docstring, URL, number, code, prose) or the position. The rule with the best token-level F1 on the
explain half wins. Its confidence is that F1 cross-validated inside the explain half, and the wording is hedged
by it ("mostly", "sometimes", "unclear, perhaps"). The held-out half is left for the scorers.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lmscope.explain.evidence import FeatureEvidence, Window
from lmscope.explain.rules import CLASSES, CONTEXT_KINDS, Rule, classify_context, render, token_classes

KindsFn = Callable[[Window], list[str]]


@dataclass(frozen=True)
class StatsConfig:
    active_frac: float = 0.5  # a token is 'firing' if its activation >= this fraction of its window's peak
    max_tokens: int = 6  # largest token set a label may list
    min_share: float = 0.5  # a context kind / previous-token set must cover this share of firings to narrow a rule
    max_negative_firings: float = 0.1  # use negative windows only if density * window length is below this


@dataclass
class StatsLabel:
    text: str
    rule: Rule
    confidence: float  # cross-validated token-level F1 of the rule on the explain half
    precision: float
    recall: float
    evidence: dict[str, Any] = field(default_factory=dict)


def window_kinds(w: Window) -> list[str]:
    """Context kinds from the window alone (used when no atlas is at hand)."""
    return classify_context(w.tokens)


@dataclass
class _Positions:
    """Token positions of the explain half with their labels (1 firing, 0 not); weak firings are left out."""

    tokens: list[list[str]]
    kinds: list[list[str]]
    starts: list[int]
    y: list[np.ndarray]  # per window: 1, 0, or -1 (ignored)

    def subset(self, parity: int) -> _Positions:
        """Every other window (the explain half's two folds)."""
        return _Positions(self.tokens[parity::2], self.kinds[parity::2], self.starts[parity::2], self.y[parity::2])

    def counts(self, rule: Rule) -> tuple[int, int, int]:
        tp = fp = fn = 0
        for toks, kinds, start, y in zip(self.tokens, self.kinds, self.starts, self.y, strict=True):
            m = np.array(rule.match_all(toks, kinds, start), dtype=bool)
            tp += int((m & (y == 1)).sum())
            fp += int((m & (y == 0)).sum())
            fn += int((~m & (y == 1)).sum())
        return tp, fp, fn


def _positions(ev: FeatureEvidence, kinds: KindsFn, frac: float, use_negatives: bool) -> _Positions:
    """Non-firing positions come from the example windows (whose activations are all known) and, for sparse
    features, from the negative windows (which may hide unsampled firings: too many of them for dense features)."""
    toks, knd, starts, ys = [], [], [], []
    for w in ev.explain + (ev.explain_negatives if use_negatives else []):
        y = np.zeros(len(w.tokens), dtype=np.int64)
        if w.kind != "negative" and w.act > 0:
            y[(w.acts > 0) & (w.acts < frac * w.act)] = -1
            y[w.active(frac)] = 1
        if w.start == 0 and len(y):
            y[0] = -1  # position 0 is BOS in atlas contexts
        toks.append(w.tokens)
        knd.append(kinds(w))
        starts.append(w.start)
        ys.append(y)
    return _Positions(toks, knd, starts, ys)


def _f1(tp: int, fp: int, fn: int) -> tuple[float, float, float]:
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    return (2 * p * r / (p + r) if p + r else 0.0), p, r


def _hedge(f1: float) -> str:
    if f1 >= 0.75:
        return ""
    if f1 >= 0.5:
        return "mostly"
    if f1 >= 0.25:
        return "sometimes"
    return "unclear, perhaps"


def _firing(pos: _Positions) -> tuple[Counter[str], Counter[str], Counter[str], list[int]]:
    tok: Counter[str] = Counter()
    prev: Counter[str] = Counter()
    kind: Counter[str] = Counter()
    where: list[int] = []
    for toks, kinds, start, y in zip(pos.tokens, pos.kinds, pos.starts, pos.y, strict=True):
        for i in np.nonzero(y == 1)[0]:
            tok[toks[i]] += 1
            if i > 0:
                prev[toks[i - 1]] += 1
            kind[kinds[i]] += 1
            where.append(start + int(i))
    return tok, prev, kind, where


def _fit(pos: _Positions, text_freq: dict[str, float], cfg: StatsConfig) -> tuple[Rule, dict[str, Any]] | None:
    """The best rule for these positions, by token-level F1 with a small penalty per condition; None if nothing
    fires."""
    tok_n, prev_n, kind_n, where = _firing(pos)
    n_fire = sum(tok_n.values())
    if n_fire == 0:
        return None
    # enrichment of each firing token text over its corpus frequency
    enrich = {t: (c / n_fire) / max(text_freq.get(t, 0.0), 1e-6) for t, c in tok_n.items()} if text_freq else {}
    by_count = [t for t, _ in tok_n.most_common()]
    by_enrich = sorted(tok_n, key=lambda t: (-(enrich.get(t, 0.0) * tok_n[t] ** 0.5), t))
    bases: list[Rule] = []
    for order in (by_count, by_enrich):
        for k in range(1, min(cfg.max_tokens, len(order)) + 1):
            bases.append(Rule(tokens=frozenset(order[:k])))
    class_n = Counter(c for t, n in tok_n.items() for c in token_classes(t) for _ in range(n))
    bases += [Rule(token_class=c) for c in CLASSES if class_n[c] > 0]

    def score(rule: Rule) -> float:
        f1, _, _ = _f1(*pos.counts(rule))
        extra = bool(rule.prev) + bool(rule.context) + (rule.max_pos is not None) + 0.2 * len(rule.tokens)
        return f1 - 0.01 * extra

    ranked = sorted(set(bases), key=lambda r: (-score(r), render(r)))[:4]
    cands = list(ranked)
    common_prev = [t for t, c in prev_n.most_common(3)]
    for base in ranked:
        for k in range(1, len(common_prev) + 1):
            share = sum(prev_n[t] for t in common_prev[:k]) / n_fire
            if share >= cfg.min_share:
                cands.append(Rule(base.tokens, base.token_class, frozenset(common_prev[:k]), None, None))
                break
        for kind in CONTEXT_KINDS:
            if kind_n[kind] / n_fire >= cfg.min_share and not (kind == "number" and base.token_class == "digit"):
                cands.append(Rule(base.tokens, base.token_class, base.prev, kind, None))
        if where and np.mean(np.array(where) <= 3) >= 0.8:
            cands.append(Rule(base.tokens, base.token_class, base.prev, base.context, 3))
    best = max(cands, key=lambda r: (score(r), -len(render(r))))
    evidence = {
        "firings": n_fire,
        "top_tokens": [{"token": t, "count": c, "enrichment": round(enrich.get(t, 0.0), 2)}
                       for t, c in tok_n.most_common(8)],
        "contexts": {k: round(v / n_fire, 3) for k, v in kind_n.most_common()},
        "previous_tokens": [{"token": t, "count": c} for t, c in prev_n.most_common(5)],
        "median_position": float(np.median(where)) if where else None,
    }  # fmt: skip
    return best, evidence


def explain_stats(ev: FeatureEvidence, freq: np.ndarray | None = None, vocab: list[str] | None = None,
                  kinds: KindsFn = window_kinds, cfg: StatsConfig | None = None) -> StatsLabel:  # fmt: skip
    """A label for the feature of `ev` (see the module doc). `freq` is the corpus frequency per token id.

    The confidence is cross-validated inside the explain half (fit on alternate windows, count hits on the
    others, both ways), so a rule that only fits noise reports a low confidence and reads "unclear, perhaps".
    """
    cfg = cfg or StatsConfig()
    length = np.mean([len(w.tokens) for w in ev.explain_negatives]) if ev.explain_negatives else 0.0
    use_negatives = bool(ev.density * length < cfg.max_negative_firings)
    pos = _positions(ev, kinds, cfg.active_frac, use_negatives)
    text_freq: dict[str, float] = {}
    tok_all = _firing(pos)[0]
    if freq is not None and vocab is not None:
        for tid, t in enumerate(vocab[: len(freq)]):
            if t in tok_all:
                text_freq[t] = text_freq.get(t, 0.0) + float(freq[tid])
    fit = _fit(pos, text_freq, cfg)
    if fit is None:
        return StatsLabel("unclear: no firing tokens in its examples", Rule(), 0.0, 0.0, 0.0, {"firings": 0})
    best, evidence = fit
    f1_in, p, r = _f1(*pos.counts(best))
    tp = fp = fn = 0
    for a, b in ((0, 1), (1, 0)):
        half = _fit(pos.subset(a), text_freq, cfg)
        if half is not None:
            c = pos.subset(b).counts(half[0])
            tp, fp, fn = tp + c[0], fp + c[1], fn + c[2]
        else:
            fn += int(sum((y == 1).sum() for y in pos.subset(b).y))
    cv, _, _ = _f1(tp, fp, fn)
    text = render(best, _hedge(cv))
    evidence |= {"negatives_used": bool(use_negatives), "cv_f1": round(cv, 4), "fit_f1": round(f1_in, 4),
                 "precision": round(p, 4), "recall": round(r, 4)}  # fmt: skip
    return StatsLabel(text, best, round(cv, 4), round(p, 4), round(r, 4), evidence)
