"""How true is a label? Three scorers over a feature's held-out evidence, each with a language-model reader and an
offline reader that runs the label as a rule (rules.parse):

- detection: given only the label, tell held-out activating windows from non-activating ones. Balanced accuracy.
- fuzzing: in held-out activating windows, tell the truly firing tokens (marked) from as many random non-firing
  tokens (marked instead). Balanced accuracy.
- simulation: predict each token's activation (0..10); Pearson correlation with the real activations over the
  held-out activating windows plus some negatives.

0.5 is chance for detection and fuzzing, 0 for simulation.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lmscope.explain.backends import Caller
from lmscope.explain.evidence import FeatureEvidence, Window
from lmscope.explain.flat import _Flat
from lmscope.explain.positions import PositionTable
from lmscope.explain.prompts import (
    DETECT_SYSTEM,
    FUZZ_SYSTEM,
    batch_messages,
    clean,
    mark,
    parse_binary,
    parse_simulation,
    scaled,
    simulate_messages,
    with_prefill,
)
from lmscope.explain.rules import Rule, parse
from lmscope.explain.stats_explainer import window_kinds
from lmscope.explain.syntax import Annotated

SCORERS = ("detection", "fuzzing", "simulation")
SCORER_MEANINGS = {  # one line each, for anyone reading a score beside a label
    "detection": "balanced accuracy of a reader who, given only the label, tells held-out windows where the feature "
    "fires from windows where it does not (0.5 is chance, 1 perfect)",
    "fuzzing": "balanced accuracy of a reader who, given the label, tells the truly firing tokens of held-out windows "
    "from as many random tokens marked instead (0.5 is chance, 1 perfect)",
    "simulation": "correlation of the activations a reader predicts from the label with the real ones on held-out "
    "windows (0 is chance, 1 perfect)",
}


def score_meaning(scorer: str | None) -> str:
    """What a score from `scorer` means (its name may carry a suffix, e.g. the reader: 'detection/rule')."""
    if not scorer:
        return "how well the label predicts where the feature fires, on held-out examples"
    base = next((k for k in SCORER_MEANINGS if scorer.startswith(k)), None)
    return f"{scorer}: {SCORER_MEANINGS[base]}" if base else f"{scorer}: a score of the label on held-out examples"
KindsFn = Callable[[Window], "Annotated | list[str]"]


@dataclass(frozen=True)
class ScoreConfig:
    n_pos: int = 10  # held-out activating windows per feature (at most)
    n_neg: int = 10  # non-activating windows (detection; half as many for simulation)
    batch: int = 5  # texts per detection / fuzzing prompt
    frac: float = 0.5  # firing tokens: activation >= frac * window peak
    seed: int = 0


@dataclass
class Score:
    scorer: str
    score: float | None  # None: could not be scored (no evidence, or a label that is no rule)
    n: int = 0
    details: dict[str, Any] = field(default_factory=dict)


def balanced_accuracy(y: list[int] | np.ndarray, pred: list[int] | np.ndarray) -> float:
    y, pred = np.asarray(y, dtype=bool), np.asarray(pred, dtype=bool)
    parts = [float((pred[y] == 1).mean()) if y.any() else None, float((pred[~y] == 0).mean()) if (~y).any() else None]
    vals = [p for p in parts if p is not None]
    return float(np.mean(vals)) if vals else 0.5


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 2 or a.std() == 0 or b.std() == 0:
        return 0.0
    return float(np.corrcoef(a, b)[0, 1])


def detection_items(ev: FeatureEvidence, cfg: ScoreConfig) -> list[tuple[Window, int]]:
    """(window, 1 activating / 0 not), in a seeded shuffled order."""
    items = [(w, 1) for w in ev.held_out[: cfg.n_pos]] + [(w, 0) for w in ev.held_out_negatives[: cfg.n_neg]]
    rng = np.random.default_rng(cfg.seed + ev.feature)
    return [items[i] for i in rng.permutation(len(items))]


def fuzz_items(ev: FeatureEvidence, cfg: ScoreConfig) -> list[tuple[Window, list[int], int]]:
    """(window, marked token indices, 1 if those are the firing tokens / 0 if as many random non-firing ones)."""
    rng = np.random.default_rng(cfg.seed + 7919 * ev.feature)
    items: list[tuple[Window, list[int], int]] = []
    for w in ev.held_out[: cfg.n_pos]:
        right = w.active(cfg.frac).tolist()
        lo = 1 if w.start == 0 else 0  # never mark BOS
        free = [i for i in range(lo, len(w.tokens)) if w.acts[i] <= 0]
        if not right or len(free) < len(right):
            continue
        wrong = sorted(int(i) for i in rng.choice(free, size=len(right), replace=False))
        items += [(w, right, 1), (w, wrong, 0)]
    return [items[i] for i in rng.permutation(len(items))]


def simulation_windows(ev: FeatureEvidence, cfg: ScoreConfig) -> list[Window]:
    return ev.held_out[: cfg.n_pos] + ev.held_out_negatives[: max(1, cfg.n_neg // 2)]


# ---------------------------------------------------------------------------------------------- offline (rule)
def rule_score(scorer: str, label: str | Rule, ev: FeatureEvidence, kinds: KindsFn = window_kinds,
               cfg: ScoreConfig | None = None, positions: PositionTable | None = None) -> Score:  # fmt: skip
    """Score a label by running it as a rule (no language model). A label that states no rule scores None.
    With `positions` (AtlasEvidence.positions()) the windows are read there instead of annotated by `kinds`."""
    cfg = cfg or ScoreConfig()
    rule = label if isinstance(label, Rule) else parse(label)
    name = f"rule-{scorer}"
    if rule is None:
        return Score(name, None, 0, {"why": "the label states no rule the offline scorer can run"})
    at: dict[int, np.ndarray] = {}
    if positions is not None:  # the held-out windows a scorer reads, at once, as one flat
        wins = list({id(w): w for w in ev.held_out[: cfg.n_pos] + ev.held_out_negatives[: max(1, cfg.n_neg)]}.values())
        lens = [len(w.tokens) for w in wins]
        idx = [positions.gather(w.context, w.start, n) for w, n in zip(wins, lens, strict=True)]
        flat = _Flat([], [np.zeros(n, np.int64) for n in lens], table=positions,
                     idx=np.concatenate(idx) if idx else np.zeros(0, np.int64))  # fmt: skip
        m = flat.rule_mask(rule)
        at = {id(w): m[s : s + n] for w, s, n in zip(wins, flat.wstart.tolist(), lens, strict=True)}

    def hits(w: Window) -> np.ndarray:
        got = at.get(id(w))
        return got if got is not None else np.array(rule.match_all(w.tokens, kinds(w), w.start), dtype=bool)

    if scorer == "detection":
        items = detection_items(ev, cfg)
        if not items:
            return Score(name, None, 0, {"why": "no held-out windows"})
        pred = [int(hits(w).any()) for w, _ in items]
        y = [t for _, t in items]
        return Score(name, balanced_accuracy(y, pred), len(items), {"positives": sum(y)})
    if scorer == "fuzzing":
        fz = fuzz_items(ev, cfg)
        if not fz:
            return Score(name, None, 0, {"why": "no held-out windows with firing tokens to fuzz"})
        pred = [int(hits(w)[marked].mean() >= 0.5) for w, marked, _ in fz]
        return Score(name, balanced_accuracy([t for *_, t in fz], pred), len(fz))
    if scorer == "simulation":
        wins = simulation_windows(ev, cfg)
        if not wins:
            return Score(name, None, 0, {"why": "no held-out windows"})
        sim = np.concatenate([hits(w).astype(float) for w in wins])
        true = np.concatenate([w.acts.astype(float) for w in wins])
        return Score(name, correlation(sim, true), len(true))
    raise ValueError(f"unknown scorer {scorer!r}; choose one of {', '.join(SCORERS)}")


# ---------------------------------------------------------------------------------------------- language model
def lm_score(scorer: str, label: str, ev: FeatureEvidence, caller: Caller, cfg: ScoreConfig | None = None) -> Score:
    """Score a label with a language-model reader (through `caller`: cache, retries, accounting)."""
    cfg = cfg or ScoreConfig()
    pre = bool(getattr(caller.backend, "prefill", False))
    if scorer in ("detection", "fuzzing"):
        if scorer == "detection":
            texts_y = [("".join(clean(t) for t in w.tokens), y) for w, y in detection_items(ev, cfg)]
            system = DETECT_SYSTEM
        else:
            texts_y = [(mark(w.tokens, marked), y) for w, marked, y in fuzz_items(ev, cfg)]
            system = FUZZ_SYSTEM
        if not texts_y:
            return Score(scorer, None, 0, {"why": "no held-out windows"})
        pred: list[int] = []
        for i in range(0, len(texts_y), cfg.batch):
            chunk = [t for t, _ in texts_y[i : i + cfg.batch]]
            msgs = with_prefill(batch_messages(system, label, chunk), "[", pre)
            budget = 2 * len(chunk) + 4 if pre else 20 + 6 * len(chunk)  # a prefilled "[" needs only the digits
            pred += caller.call(msgs, functools.partial(parse_binary, n=len(chunk)), max_tokens=budget)
        y = [t for _, t in texts_y]
        return Score(scorer, balanced_accuracy(y, pred), len(y), {"positives": sum(y)})
    if scorer == "simulation":
        wins = simulation_windows(ev, cfg)
        if not wins:
            return Score(scorer, None, 0, {"why": "no held-out windows"})
        preds, trues = [], []
        for w in wins:
            n = len(w.tokens)
            msgs = with_prefill(simulate_messages(label, w.tokens), "0\t", pre)
            preds.append(caller.call(msgs, functools.partial(parse_simulation, n=n), max_tokens=8 * n + 20))
            trues.append(scaled(w.acts, ev.max_act).astype(float))
        true = np.concatenate(trues)
        return Score(scorer, correlation(np.concatenate(preds), true), len(true))
    raise ValueError(f"unknown scorer {scorer!r}; choose one of {', '.join(SCORERS)}")
