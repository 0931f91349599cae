"""The `stats` explainer: an offline label built from evidence, with no language model.

It looks at the tokens where the feature fires in the explain half of its examples (activation >= half the
window's peak) and searches a small space of runnable rules (rules.py). First a **token-list label**: the most
frequent firing tokens (ranked by count and by enrichment over their corpus frequency) or a token class (digits,
punctuation, capitalized words ...). Then **context parts** that narrow it, each taken from what the firings share:
- the previous token, or the text right before ("right after 'Decimal('"), or a word earlier on the line;
- the context kind (string, comment, docstring, URL, number, code, prose) and the syntax class (for code from
  Python's tokenizer: keyword, name, called name, attribute, defined name, operator; for prose: sentence start,
  inside quotes, inside parentheses);
- the document it comes from, when the atlas stores sources ("in the document 'decimal.py'");
- what follows it: the next tokens, tried among the tokens the feature's logit effects promote (what it predicts)
  and the most common ones;
- the position (near the start of the context).
Rules are compared by token-level F1 with a small penalty per condition. The context label replaces the token-list
label only if it generalises better: both are refitted on alternate windows of the explain half and counted on the
others (cross-validated F1), and the context label must win. The held-out half is never looked at; it is left for
the scorers. The wording is hedged by the cross-validated F1 ("mostly", "sometimes", "unclear, perhaps").
"""

from __future__ import annotations

import functools
import itertools
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lmscope.explain.evidence import FeatureEvidence, Window, median
from lmscope.explain.flat import _Flat, _View
from lmscope.explain.positions import PositionTable
from lmscope.explain.rules import CLASSES, Rule, Seq, extend, render, token_classes
from lmscope.explain.syntax import CONTEXT_KINDS, SYNTAX_CLASSES, Annotated, annotate

KindsFn = Callable[[Window], "Annotated | list[str]"]
_NONE = Rule()
SECOND_PART_GAIN = 0.02  # a second context part must raise the fit's score by this much (small samples overfit)
PARTS = ("prev", "after", "anchor", "next", "context", "syntax", "source", "position")


@dataclass(frozen=True)
class StatsConfig:
    active_frac: float = 0.5  # a token is 'firing' if its activation >= this fraction of its window's peak
    max_tokens: int = 6  # largest token set a token-list label may list
    context_tokens: int = 10  # largest token set a label with a context part may list (the part keeps it precise)
    min_share: float = 0.5  # a context part must hold for this share of the firings to be tried
    max_negative_firings: float = 0.1  # use negative windows only if density * window length is below this
    parts: tuple[str, ...] = PARTS  # context parts the search may add (see PARTS)
    min_gain: float = 0.0  # cross-validated F1 a context label must gain over the token-list label


@dataclass
class StatsLabel:
    text: str
    rule: Rule
    confidence: float  # cross-validated token-level F1 of the chosen rule on the explain half
    precision: float
    recall: float
    evidence: dict[str, Any] = field(default_factory=dict)
    token_text: str = ""  # the token-list label (no context part), for comparison
    token_rule: Rule = field(default_factory=Rule)


def window_kinds(w: Window) -> Annotated:
    """Annotations from the window alone (used when no atlas is at hand)."""
    return annotate(w.tokens)


@functools.lru_cache(maxsize=1 << 16)
def _classes(t: str) -> tuple[str, ...]:
    return tuple(token_classes(t))


def _positions(ev: FeatureEvidence, frac: float, use_negatives: bool
               ) -> tuple[list[Window], np.ndarray, np.ndarray, list[int]]:  # fmt: skip
    """The explain half's windows and its negatives, with a label per token, end to end (1 firing, 0 not, -1
    ignored: weak firings, position 0, which is BOS in atlas contexts, and every token of a negative window unless
    `use_negatives`: they may hide unsampled firings, too many of them for dense features), each window's length,
    and a label per window (1 an example, 0 a negative; what a detection reader tells apart)."""
    wins = ev.explain + ev.explain_negatives
    lens = np.array([len(w.tokens) for w in wins], dtype=np.int64)
    neg = np.array([w.kind == "negative" for w in wins], dtype=bool)
    acts = np.concatenate([w.acts for w in wins]) if wins else np.zeros(0, np.float32)
    starts = np.cumsum(lens) - lens
    peak = np.zeros(len(wins), dtype=np.float64)  # Window.act: the window's peak as a Python float
    full = lens > 0
    if full.any():
        peak[full] = np.maximum.reduceat(acts, starts[full]).astype(np.float64)
    fires = ~neg & (peak > 0)
    # Window.active compares float32 activations with frac * act, a Python float, in float32 (NEP 50)
    thr = np.repeat((frac * peak).astype(np.float32), lens)
    on = np.repeat(fires, lens) & (acts > 0)
    y = np.zeros(len(acts), dtype=np.int64)
    y[on & (acts < thr)] = -1
    y[on & (acts >= thr)] = 1
    if not use_negatives:
        y[np.repeat(neg, lens)] = -1
    first = starts[full & (np.array([w.start for w in wins], dtype=np.int64) == 0)]
    y[first] = -1
    return wins, y, lens, [int(f) for f in fires]


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


def _top_set(c: Counter[Any], n_fire: int, share: float, k_max: int = 3) -> frozenset[Any] | None:
    """The smallest set of the most common values (at most k_max) that covers `share` of the firings."""
    common = [v for v, _ in c.most_common(k_max) if v]
    for k in range(1, len(common) + 1):
        if sum(c[v] for v in common[:k]) / n_fire >= share:
            return frozenset(common[:k])
    return None


def _extensions(flat: _Flat, sel: np.ndarray, fire: np.ndarray, cfg: StatsConfig,
                promoted: list[str]) -> list[dict[str, Any]]:  # fmt: skip
    """Candidate context parts (field -> value of a Rule), each holding for enough of the firings."""
    n_fire = len(fire)
    share = cfg.min_share
    out: list[dict[str, Any]] = []
    parts = set(cfg.parts)
    if "prev" in parts and (s := _top_set(Counter(flat.vals("prev", fire)), n_fire, share)):
        out.append({"prev": s})
    if "after" in parts:
        joined: Counter[str] = Counter()
        for i in fire.tolist():
            for text in flat.after_texts(i):
                joined[text] += 1
        out += [{"after": v} for v, c in joined.most_common(2) if c / n_fire >= share]
    if "anchor" in parts:
        anchors: Counter[str] = Counter(itertools.chain.from_iterable(map(flat.line_words, fire.tolist())))
        quiet = np.flatnonzero(sel & (flat.y == 0))
        for v, c in anchors.most_common(3):
            if c / n_fire < share:
                continue
            base_rate = flat.on_line(v, quiet) / len(quiet) if len(quiet) else 0.0
            if c / n_fire >= 2 * base_rate:  # on the line far more often when it fires
                out.append({"anchor": v})
    if "next" in parts:
        nxt = Counter(flat.vals("next", fire))
        if s := _top_set(nxt, n_fire, share):
            out.append({"next": s})
        predicted = frozenset(t for t in promoted if nxt[t] > 0)
        if predicted and sum(nxt[t] for t in predicted) / n_fire >= share / 2:
            out.append({"next": predicted})
    if "context" in parts:
        kinds = Counter(flat.vals("context", fire))
        out += [{"context": k} for k in CONTEXT_KINDS if kinds[k] / n_fire >= share]
    if "syntax" in parts:
        syn = Counter(flat.vals("syntax", fire))
        out += [{"syntax": k} for k in SYNTAX_CLASSES if syn[k] / n_fire >= share]
    if "source" in parts and (s := _top_set(Counter(flat.vals("source", fire)), n_fire, share)):
        out.append({"source": s})
    if "position" in parts and n_fire and np.count_nonzero(flat.pos[fire] <= 3) / n_fire >= 0.8:  # np.mean
        out.append({"max_pos": 3})
    return out


def _balanced(hit_pos: int, n_pos: int, hit_neg: int, n_neg: int) -> float:
    parts = ([hit_pos / n_pos] if n_pos else []) + ([1 - hit_neg / n_neg] if n_neg else [])
    return sum(parts) / len(parts) if parts else 0.5


def text_frequencies(freq: np.ndarray, vocab: list[str]) -> dict[str, float]:
    """Corpus frequency of each token text (ids that decode alike summed): compute once per atlas and pass it to
    explain_stats as `freq` when labelling many features."""
    out: dict[str, float] = {}
    for tid, t in enumerate(vocab[: len(freq)]):
        out[t] = out.get(t, 0.0) + float(freq[tid])
    return out


def _quality(flat: _Flat, sel: np.ndarray | _View, rule: Rule) -> float:
    """Half token-level F1 (which tokens fire, what a fuzzing reader checks), half window-level balanced accuracy
    (which windows hold a firing, what a detection reader checks)."""
    tp, fp, fn, hit_pos, n_pos, hit_neg, n_neg = flat.all_counts(rule, sel)
    return 0.5 * _f1(tp, fp, fn)[0] + 0.5 * _balanced(hit_pos, n_pos, hit_neg, n_neg)


def _score(flat: _Flat, sel: np.ndarray | _View, rule: Rule) -> float:
    return _quality(flat, sel, rule) - 0.01 * (rule.extras() + 0.2 * len(rule.tokens))


class _Order:
    """Rules ranked by (-score, length of the label, label) on one fold, the label rendered only to break a tie of
    scores (the order and the first minimum are those of sorting and `min` by that key)."""

    def __init__(self, flat: _Flat, view: _View) -> None:
        self.flat, self.view = flat, view
        self.neg: dict[Rule, float] = {}

    def score(self, r: Rule) -> float:
        return -self._key(r)

    def _key(self, r: Rule) -> float:
        got = self.neg.get(r)
        if got is None:  # -_score(flat, view, r), inlined
            tp, fp, fn, hit_pos, n_pos, hit_neg, n_neg = self.flat.all_counts(r, self.view)
            q = 0.5 * _f1(tp, fp, fn)[0] + 0.5 * _balanced(hit_pos, n_pos, hit_neg, n_neg)
            got = self.neg[r] = -(q - 0.01 * (r.extras() + 0.2 * len(r.tokens)))
        return got

    def _text_key(self, r: Rule) -> tuple[int, str]:
        text = self.flat.render(r)
        return len(text), text

    def sorted(self, rules: list[Rule]) -> list[Rule]:
        by_score = sorted(rules, key=self._key)
        out: list[Rule] = []
        i = 0
        while i < len(by_score):
            j = i + 1
            k = self._key(by_score[i])
            while j < len(by_score) and self._key(by_score[j]) == k:
                j += 1
            out += sorted(by_score[i:j], key=self._text_key) if j - i > 1 else by_score[i:j]
            i = j
        return out

    def min(self, rules: list[Rule]) -> Rule:
        best = rules[0]
        kb = self._key(best)
        for r in rules[1:]:
            k = self._key(r)
            if k < kb or (k == kb and self._text_key(r) < self._text_key(best)):
                best, kb = r, k
        return best


def _fit(flat: _Flat, sel: np.ndarray, text_freq: dict[str, float], cfg: StatsConfig,
         promoted: list[str], with_evidence: bool = True) -> tuple[Rule, Rule, dict[str, Any]] | None:  # fmt: skip
    """(the best token-list rule, the best rule with context parts, evidence) on the positions `sel`; None if
    nothing fires there. The evidence is left empty unless `with_evidence`."""
    fire = np.flatnonzero(sel & (flat.y == 1))
    n_fire = len(fire)
    if n_fire == 0:
        return None
    tok_n = Counter(flat.vals("tokens", fire))
    enrich = {t: (c / n_fire) / max(text_freq.get(t, 0.0), 1e-6) for t, c in tok_n.items()} if text_freq else {}
    by_count = [t for t, _ in tok_n.most_common()]
    by_enrich = sorted(tok_n, key=lambda t: (-(enrich.get(t, 0.0) * tok_n[t] ** 0.5), t))
    bases: list[Rule] = []
    for order in (by_count, by_enrich):
        for k in range(1, min(cfg.max_tokens, len(order)) + 1):
            bases.append(extend(_NONE, {"tokens": frozenset(order[:k])}))
    present = {c for t in tok_n for c in _classes(t)}  # classes with a firing
    bases += [extend(_NONE, {"token_class": c}) for c in CLASSES if c in present]

    rank = _Order(flat, flat.view(sel))
    ranked = rank.sorted(list(set(bases)))
    token_best = ranked[0]
    exts = _extensions(flat, sel, fire, cfg, promoted)
    cands = list(ranked[:4]) + [extend(_NONE, e) for e in exts if "max_pos" not in e]  # a part alone: any token
    wider = [extend(_NONE, {"tokens": frozenset(o[:k])}) for o in (by_count, by_enrich)
             for k in range(cfg.max_tokens + 2, min(cfg.context_tokens, len(o)) + 1, 2)]  # fmt: skip
    classes = [r for r in ranked[4:] if r.token_class]  # (ranked holds each rule once)
    for base in ranked[:4] + wider + classes:
        for e in exts:
            if "context" in e and e["context"] == "number" and base.token_class == "digit":
                continue
            cands.append(extend(base, e))
    best = rank.min(cands)
    if best.extras():  # a second part, from a different field
        have = {c[0] for c in best.conditions()}
        more = [extend(best, e) for e in exts if not set(e) & have]
        two = rank.min(more) if more else None
        if two is not None and rank.score(two) >= rank.score(best) + SECOND_PART_GAIN:
            best = two
    if not with_evidence:
        return token_best, best, {}
    where = flat.pos[fire]
    col = {k: flat.vals(k, fire) for k in ("context", "syntax", "prev", "next", "source")}
    evidence = {
        "firings": n_fire,
        "top_tokens": [{"token": t, "count": c, "enrichment": round(enrich.get(t, 0.0), 2)}
                       for t, c in tok_n.most_common(8)],
        "contexts": {k: round(v / n_fire, 3) for k, v in Counter(col["context"]).most_common()},
        "syntax": {k: round(v / n_fire, 3) for k, v in Counter(col["syntax"]).most_common(5) if k},
        "previous_tokens": [{"token": t, "count": c} for t, c in Counter(col["prev"]).most_common(5)],
        "next_tokens": [{"token": t, "count": c} for t, c in Counter(col["next"]).most_common(5)],
        "sources": [{"source": s, "count": c} for s, c in Counter(col["source"]).most_common(3) if s],
        "promoted": promoted[:10],
        "median_position": median(where) if len(where) else None,
    }  # fmt: skip
    return token_best, best, evidence


def explain_stats(ev: FeatureEvidence, freq: np.ndarray | dict[str, float] | None = None,
                  vocab: list[str] | None = None, kinds: KindsFn = window_kinds, cfg: StatsConfig | None = None,
                  promoted: list[str] | None = None, positions: PositionTable | None = None) -> StatsLabel:  # fmt: skip
    """A label for the feature of `ev` (see the module doc). `freq` is the corpus frequency per token id (or per
    token text, `text_frequencies`, to label many features), `kinds`
    annotates a window (AtlasEvidence.kinds reads the whole context, its document and the tokens around it),
    `promoted` lists the tokens the feature's logit effects promote (AtlasEvidence.promoted). With `positions`
    (AtlasEvidence.positions(): every context of the atlas annotated once) the windows are looked up there instead
    of annotated through `kinds`: the same label, faster when labelling many features.

    The confidence is cross-validated inside the explain half (fit on alternate windows, count hits on the
    others, both ways), so a rule that only fits noise reports a low confidence and reads "unclear, perhaps".
    """
    cfg = cfg or StatsConfig()
    promoted = promoted or []
    lengths = [len(w.tokens) for w in ev.explain_negatives]
    length = sum(lengths) / len(lengths) if lengths else 0.0  # np.mean, exactly (small integers)
    use_negatives = bool(ev.density * length < cfg.max_negative_firings)
    wins, y, lens, wl = _positions(ev, cfg.active_frac, use_negatives)
    if positions is not None:
        idx = positions.gather_many([w.context for w in wins], [w.start for w in wins], lens)
        flat = _Flat([], (y, lens), wl, table=positions, idx=idx)
    else:
        flat = _Flat([Seq.of(w.tokens, kinds(w), w.start) for w in wins], (y, lens), wl)
    every = np.ones(len(flat.y), dtype=bool)
    text_freq: dict[str, float] = {}
    if isinstance(freq, dict):
        text_freq = freq
    elif freq is not None and vocab is not None:
        firing_texts = set(flat.vals("tokens", np.flatnonzero(flat.y == 1)))
        text_freq = {t: f for t, f in text_frequencies(freq, vocab).items() if t in firing_texts}
    fit = _fit(flat, every, text_freq, cfg, promoted)
    if fit is None:
        return StatsLabel("unclear: no firing tokens in its examples", Rule(), 0.0, 0.0, 0.0, {"firings": 0})
    token_best, best, evidence = fit
    # cross-validation inside the explain half, for the token-list rule and the context rule alike: token counts
    # (the confidence) and window counts (with them, the quality the context label must raise)
    tok_c = {"token": [0, 0, 0], "context": [0, 0, 0]}
    win_c = {"token": [0, 0, 0, 0], "context": [0, 0, 0, 0]}
    for a in (0, 1):
        fit_sel, test_sel = flat.win % 2 == a, flat.win % 2 == 1 - a
        test_view = flat.view(test_sel)
        half = _fit(flat, fit_sel, text_freq, cfg, promoted, with_evidence=False)
        for name, k in (("token", 0), ("context", 1)):
            if half is not None:
                rule = half[0] if k == 0 else half[1]
                c, wc = flat.counts(rule, test_view), flat.window_counts(rule, test_view)
            else:
                c, wc = (0, 0, int((flat.y[test_sel] == 1).sum())), flat.window_counts(Rule(), test_view)
            tok_c[name] = [x + y for x, y in zip(tok_c[name], c, strict=True)]
            win_c[name] = [x + y for x, y in zip(win_c[name], wc, strict=True)]
    cv_f1 = {k: _f1(*tok_c[k])[0] for k in tok_c}
    cv_q = {k: 0.5 * cv_f1[k] + 0.5 * _balanced(*win_c[k]) for k in tok_c}
    kept = best != token_best and cv_q["context"] > cv_q["token"] + cfg.min_gain
    chosen, cv = (best, cv_f1["context"]) if kept else (token_best, cv_f1["token"])
    f1_in, p, r = _f1(*flat.counts(chosen, every))
    text = render(chosen, _hedge(cv))
    evidence |= {"negatives_used": bool(use_negatives), "cv_f1": round(cv, 4), "fit_f1": round(f1_in, 4),
                 "precision": round(p, 4), "recall": round(r, 4), "cv_quality_token_list": round(cv_q["token"], 4),
                 "cv_quality_context": round(cv_q["context"], 4), "context_kept": bool(kept),
                 "context_label": render(best) if best != token_best else None}  # fmt: skip
    token_text = render(token_best, _hedge(cv_f1["token"]))
    return StatsLabel(text, chosen, round(cv, 4), round(p, 4), round(r, 4), evidence, token_text, token_best)
