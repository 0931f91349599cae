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

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from lmscope.explain.evidence import FeatureEvidence, Window
from lmscope.explain.rules import CLASSES, LINE_LOOKBACK, LOOKBACK, Rule, Seq, check, render, token_classes
from lmscope.explain.syntax import CONTEXT_KINDS, SYNTAX_CLASSES, Annotated, annotate

KindsFn = Callable[[Window], "Annotated | list[str]"]
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


def _positions(ev: FeatureEvidence, frac: float, use_negatives: bool
               ) -> tuple[list[Window], list[np.ndarray], list[int]]:  # fmt: skip
    """The explain half's windows and its negatives, with a label per token (1 firing, 0 not, -1 ignored: weak
    firings, position 0, which is BOS in atlas contexts, and every token of a negative window unless
    `use_negatives`: they may hide unsampled firings, too many of them for dense features) and per window (1 an
    example, 0 a negative; what a detection reader tells apart)."""
    wins, ys, wl = [], [], []
    for w in ev.explain + ev.explain_negatives:
        y = np.zeros(len(w.tokens), dtype=np.int64)
        if w.kind != "negative" and w.act > 0:
            y[(w.acts > 0) & (w.acts < frac * w.act)] = -1
            y[w.active(frac)] = 1
        elif w.kind == "negative" and not use_negatives:
            y[:] = -1
        if w.start == 0 and len(y):
            y[0] = -1
        wins.append(w)
        ys.append(y)
        wl.append(int(w.kind != "negative" and w.act > 0) if w.kind != "negative" else 0)
    return wins, ys, wl


class _Flat:
    """Every position of the explain half in one flat array, with each condition's mask computed once (the same
    semantics as rules.check, vectorized where it is a lookup)."""

    def __init__(self, seqs: list[Seq], ys: list[np.ndarray], window_labels: list[int] | None = None) -> None:
        self.seqs = seqs
        self.wlab = np.array(window_labels if window_labels is not None else [1] * len(ys), dtype=np.int64)
        self.wlen = np.array([len(y) for y in ys], dtype=np.int64)
        self.wstart = (np.cumsum(self.wlen) - self.wlen).astype(np.int64)
        self.y = np.concatenate(ys) if ys else np.zeros(0, np.int64)
        self.win = np.concatenate([np.full(len(y), k) for k, y in enumerate(ys)]) if ys else np.zeros(0, np.int64)
        self.at = [(k, i) for k, y in enumerate(ys) for i in range(len(y))]
        tok, prev, nxt, kind, syn, src, pos = [], [], [], [], [], [], []
        for s, y in zip(seqs, ys, strict=True):
            for i in range(len(y)):
                j = s.off + i
                tok.append(s.full[j])
                prev.append(s.full[j - 1] if j > 0 else None)
                nxt.append(s.full[j + 1] if j + 1 < len(s.full) else None)
                kind.append(s.ann.kinds[i])
                syn.append(s.ann.syntax[i])
                src.append(s.ann.sources[i])
                pos.append(s.start + i)
        self.cols: dict[str, list[Any]] = {"tokens": tok, "prev": prev, "next": nxt, "context": kind,
                                           "syntax": syn, "source": src}  # fmt: skip
        self.pos = np.array(pos, dtype=np.int64)
        self._cache: dict[tuple[str, Any], np.ndarray] = {}
        self._words: dict[int, frozenset[str]] = {}
        self._index: dict[str, dict[Any, np.ndarray]] = {}
        self._rules: dict[Rule, np.ndarray] = {}
        self._hits: dict[Rule, np.ndarray] = {}

    def line_words(self, i: int) -> frozenset[str]:
        """The words (alphanumeric, over one character, no special token) earlier on position i's line, within
        LINE_LOOKBACK tokens: the candidates for an `anchor` part (cached)."""
        got = self._words.get(i)
        if got is None:
            k, t = self.at[i]
            seq = self.seqs[k]
            seen = set()
            for j in range(seq.off + t - 1, max(-1, seq.off + t - 1 - LINE_LOOKBACK), -1):
                if "\n" in seq.full[j]:
                    break
                w = seq.full[j].strip()
                if len(w) > 1 and any(ch.isalnum() for ch in w) and seq.full[j] not in seq.ann.specials:
                    seen.add(w)
            got = self._words[i] = frozenset(seen)
        return got

    def mask(self, cond: tuple[str, Any]) -> np.ndarray:
        if cond not in self._cache:
            kind, v = cond
            if kind in ("tokens", "prev", "next", "source"):
                m = np.zeros(len(self.y), dtype=bool)
                where = self._where(kind)
                for x in v:
                    if x in where:
                        m[where[x]] = True
            elif kind in ("context", "syntax"):
                m = np.zeros(len(self.y), dtype=bool)
                m[self._where(kind).get(v, [])] = True
            elif kind == "class":
                fn = CLASSES[v][1]
                m = np.zeros(len(self.y), dtype=bool)
                for x, idx in self._where("tokens").items():
                    if fn(x):
                        m[idx] = True
            elif kind == "max_pos":
                m = self.pos <= v
            else:
                m = np.array([check(cond, self.seqs[k], i) for k, i in self.at], dtype=bool)
            self._cache[cond] = m
        return self._cache[cond]

    def _where(self, col: str) -> dict[Any, np.ndarray]:
        """Positions of each value of a column."""
        if col not in self._index:
            groups: dict[Any, list[int]] = {}
            for i, x in enumerate(self.cols[col]):
                groups.setdefault(x, []).append(i)
            self._index[col] = {x: np.array(ix, dtype=np.int64) for x, ix in groups.items()}
        return self._index[col]

    def rule_mask(self, rule: Rule) -> np.ndarray:
        got = self._rules.get(rule)
        if got is None:
            got = np.zeros(len(self.y), dtype=bool)
            conds = rule.conditions()
            if conds:
                got[:] = True
                for c in conds:
                    got &= self.mask(c)
            self._rules[rule] = got
        return got

    def hits(self, rule: Rule) -> np.ndarray:
        """Whether the rule fires anywhere in each window (cached)."""
        got = self._hits.get(rule)
        if got is None:
            m = self.rule_mask(rule)
            got = np.zeros(len(self.wlab), dtype=bool)
            nonempty = self.wlen > 0
            if len(m):
                got[nonempty] = np.logical_or.reduceat(m, self.wstart[nonempty])
            self._hits[rule] = got
        return got

    def view(self, sel: np.ndarray) -> _View:
        wsel = np.zeros(len(self.wlab), dtype=bool)
        wsel[np.unique(self.win[sel])] = True
        y1, y0 = sel & (self.y == 1), sel & (self.y == 0)
        return _View(y1, y0, int(y1.sum()), wsel & (self.wlab == 1), wsel & (self.wlab == 0))

    def counts(self, rule: Rule, sel: np.ndarray | _View) -> tuple[int, int, int]:
        v = sel if isinstance(sel, _View) else self.view(sel)
        m = self.rule_mask(rule)
        tp = int(np.count_nonzero(m & v.y1))
        return tp, int(np.count_nonzero(m & v.y0)), v.n1 - tp

    def window_counts(self, rule: Rule, sel: np.ndarray | _View) -> tuple[int, int, int, int]:
        """(examples hit, examples, negatives hit, negatives) over the windows of `sel`: does the rule fire
        anywhere in a window, as a detection reader would say."""
        v = sel if isinstance(sel, _View) else self.view(sel)
        hit = self.hits(rule)
        return (int(np.count_nonzero(hit & v.wpos)), int(v.wpos.sum()), int(np.count_nonzero(hit & v.wneg)),
                int(v.wneg.sum()))  # fmt: skip


@dataclass
class _View:
    """A selection of positions (a fold), precomputed for counting."""

    y1: np.ndarray  # firing positions in the selection
    y0: np.ndarray  # quiet positions in the selection
    n1: int
    wpos: np.ndarray  # example windows in the selection
    wneg: np.ndarray  # negative windows in the selection


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
    col = flat.cols
    out: list[dict[str, Any]] = []
    parts = set(cfg.parts)
    if "prev" in parts and (s := _top_set(Counter(col["prev"][i] for i in fire), n_fire, share)):
        out.append({"prev": s})
    if "after" in parts:
        joined: Counter[str] = Counter()
        for i in fire:
            k, t = flat.at[i]
            seq = flat.seqs[k]
            j = seq.off + t
            for n in (2, 3):
                if j - n >= 0:
                    text = "".join(seq.full[j - n : j])
                    special = any(x in seq.ann.specials for x in seq.full[j - n : j])
                    if text.strip() and "\n" not in text[:-1] and n <= LOOKBACK and not special:
                        joined[text] += 1
        out += [{"after": v} for v, c in joined.most_common(2) if c / n_fire >= share]
    if "anchor" in parts:
        line_words = flat.line_words
        anchors: Counter[str] = Counter(w for i in fire.tolist() for w in line_words(i))
        quiet = np.flatnonzero(sel & (flat.y == 0)).tolist()
        for v, c in anchors.most_common(3):
            if c / n_fire < share:
                continue
            base_rate = sum(v in line_words(i) for i in quiet) / len(quiet) if quiet else 0.0
            if c / n_fire >= 2 * base_rate:  # on the line far more often when it fires
                out.append({"anchor": v})
    if "next" in parts:
        nxt = Counter(col["next"][i] for i in fire)
        if s := _top_set(nxt, n_fire, share):
            out.append({"next": s})
        predicted = frozenset(t for t in promoted if nxt[t] > 0)
        if predicted and sum(nxt[t] for t in predicted) / n_fire >= share / 2:
            out.append({"next": predicted})
    if "context" in parts:
        kinds = Counter(col["context"][i] for i in fire)
        out += [{"context": k} for k in CONTEXT_KINDS if kinds[k] / n_fire >= share]
    if "syntax" in parts:
        syn = Counter(col["syntax"][i] for i in fire)
        out += [{"syntax": k} for k in SYNTAX_CLASSES if syn[k] / n_fire >= share]
    if "source" in parts and (s := _top_set(Counter(col["source"][i] for i in fire), n_fire, share)):
        out.append({"source": s})
    if "position" in parts and n_fire and np.mean(flat.pos[fire] <= 3) >= 0.8:
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
    return 0.5 * _f1(*flat.counts(rule, sel))[0] + 0.5 * _balanced(*flat.window_counts(rule, sel))


def _score(flat: _Flat, sel: np.ndarray | _View, rule: Rule) -> float:
    return _quality(flat, sel, rule) - 0.01 * (rule.extras() + 0.2 * len(rule.tokens))


def _fit(flat: _Flat, sel: np.ndarray, text_freq: dict[str, float], cfg: StatsConfig,
         promoted: list[str]) -> tuple[Rule, Rule, dict[str, Any]] | None:  # fmt: skip
    """(the best token-list rule, the best rule with context parts, evidence) on the positions `sel`; None if
    nothing fires there."""
    fire = np.flatnonzero(sel & (flat.y == 1))
    n_fire = len(fire)
    if n_fire == 0:
        return None
    tok_n = Counter(flat.cols["tokens"][i] for i in fire)
    enrich = {t: (c / n_fire) / max(text_freq.get(t, 0.0), 1e-6) for t, c in tok_n.items()} if text_freq else {}
    by_count = [t for t, _ in tok_n.most_common()]
    by_enrich = sorted(tok_n, key=lambda t: (-(enrich.get(t, 0.0) * tok_n[t] ** 0.5), t))
    bases: list[Rule] = []
    for order in (by_count, by_enrich):
        for k in range(1, min(cfg.max_tokens, len(order)) + 1):
            bases.append(Rule(tokens=frozenset(order[:k])))
    class_n = Counter(c for t, n in tok_n.items() for c in token_classes(t) for _ in range(n))
    bases += [Rule(token_class=c) for c in CLASSES if class_n[c] > 0]

    view = flat.view(sel)
    keys: dict[Rule, tuple[float, int, str]] = {}

    def key(r: Rule) -> tuple[float, int, str]:
        if r not in keys:
            text = render(r)
            keys[r] = (-_score(flat, view, r), len(text), text)
        return keys[r]

    ranked = sorted(set(bases), key=key)
    token_best = ranked[0]
    exts = _extensions(flat, sel, fire, cfg, promoted)
    cands = list(ranked[:4]) + [Rule(**e) for e in exts if "max_pos" not in e]  # a part alone: any token there
    wider = [Rule(tokens=frozenset(o[:k])) for o in (by_count, by_enrich)
             for k in range(cfg.max_tokens + 2, min(cfg.context_tokens, len(o)) + 1, 2)]  # fmt: skip
    classes = [r for r in ranked if r.token_class and r not in ranked[:4]]
    for base in ranked[:4] + wider + classes:
        for e in exts:
            if "context" in e and e["context"] == "number" and base.token_class == "digit":
                continue
            cands.append(replace(base, **e))
    best = min(cands, key=key)
    if best.extras():  # a second part, from a different field
        have = {c[0] for c in best.conditions()}
        more = [replace(best, **e) for e in exts if not set(e) & have]
        two = min(more, key=key) if more else None
        if two is not None and -key(two)[0] >= -key(best)[0] + SECOND_PART_GAIN:
            best = two
    where = flat.pos[fire]
    col = flat.cols
    evidence = {
        "firings": n_fire,
        "top_tokens": [{"token": t, "count": c, "enrichment": round(enrich.get(t, 0.0), 2)}
                       for t, c in tok_n.most_common(8)],
        "contexts": {k: round(v / n_fire, 3) for k, v in Counter(col["context"][i] for i in fire).most_common()},
        "syntax": {k: round(v / n_fire, 3) for k, v in Counter(col["syntax"][i] for i in fire).most_common(5) if k},
        "previous_tokens": [{"token": t, "count": c} for t, c in Counter(col["prev"][i] for i in fire).most_common(5)],
        "next_tokens": [{"token": t, "count": c} for t, c in Counter(col["next"][i] for i in fire).most_common(5)],
        "sources": [{"source": s, "count": c} for s, c in Counter(col["source"][i] for i in fire).most_common(3) if s],
        "promoted": promoted[:10],
        "median_position": float(np.median(where)) if len(where) else None,
    }  # fmt: skip
    return token_best, best, evidence


def explain_stats(ev: FeatureEvidence, freq: np.ndarray | dict[str, float] | None = None,
                  vocab: list[str] | None = None, kinds: KindsFn = window_kinds, cfg: StatsConfig | None = None,
                  promoted: list[str] | None = None) -> StatsLabel:  # fmt: skip
    """A label for the feature of `ev` (see the module doc). `freq` is the corpus frequency per token id (or per
    token text, `text_frequencies`, to label many features), `kinds`
    annotates a window (AtlasEvidence.kinds reads the whole context, its document and the tokens around it),
    `promoted` lists the tokens the feature's logit effects promote (AtlasEvidence.promoted).

    The confidence is cross-validated inside the explain half (fit on alternate windows, count hits on the
    others, both ways), so a rule that only fits noise reports a low confidence and reads "unclear, perhaps".
    """
    cfg = cfg or StatsConfig()
    promoted = promoted or []
    length = np.mean([len(w.tokens) for w in ev.explain_negatives]) if ev.explain_negatives else 0.0
    use_negatives = bool(ev.density * length < cfg.max_negative_firings)
    wins, ys, wl = _positions(ev, cfg.active_frac, use_negatives)
    seqs = [Seq.of(w.tokens, kinds(w), w.start) for w in wins]
    flat = _Flat(seqs, ys, wl)
    every = np.ones(len(flat.y), dtype=bool)
    text_freq: dict[str, float] = {}
    if isinstance(freq, dict):
        text_freq = freq
    elif freq is not None and vocab is not None:
        firing_texts = {flat.cols["tokens"][i] for i in np.flatnonzero(flat.y == 1)}
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
        half = _fit(flat, fit_sel, text_freq, cfg, promoted)
        for name, k in (("token", 0), ("context", 1)):
            if half is not None:
                rule = half[0] if k == 0 else half[1]
                c, wc = flat.counts(rule, test_sel), flat.window_counts(rule, test_sel)
            else:
                c, wc = (0, 0, int((flat.y[test_sel] == 1).sum())), flat.window_counts(Rule(), test_sel)
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
