"""Linear probes at every layer, with the controls that say whether they read the concept.

Per layer, on the battery's train split: a **difference-of-means** direction and a **logistic** probe (standardised
features, L2, C = `c`). Scored by AUROC on validation (which picks the best layer: never the test split), on test
(unseen topics) and on transfer (the held-out template family), and by the true-positive rate at a fixed false-
positive rate whose threshold is set on validation negatives. Controls, at every layer:
- **shuffled labels**: the same logistic probe trained on random labels (half of each class each, so they carry
  no trace of the concept); its test AUROC should sit at chance;
- **seen topics**: the probe trained on half of the train pairs and scored on the other half (same topics, other
  pairs). High here but chance on unseen topics means it learned the topics' cues, not the concept;
- **topic readout**: a probe trained to tell two halves of the train topics apart (the concept balanced in each):
  how much topic the layer carries, for reference (pairs are topic-matched, so topic alone cannot score).

`validity` turns those figures into a light with its evidence: "established", "weak" or "not established". A
concept that the token embeddings (layer 0) already separate is only "weak": the probe reads the words.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from lmscope.audit.batteries import Item

ESTABLISHED, WEAK = 0.8, 0.65  # test AUROC on unseen topics
TRANSFER_OK = 0.7
CHANCE_BAND = (0.35, 0.65)  # a control's AUROC inside it is "at chance"
LEXICAL = 0.9  # test AUROC at layer 0 (the embeddings) from which a concept counts as read from the words alone


@dataclass
class ProbeConfig:
    c: float = 0.1  # inverse L2 strength of the logistic probes
    fpr: float = 0.05  # the fixed false-positive rate for the true-positive figure
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def auroc(y: np.ndarray, s: np.ndarray) -> float | None:
    from sklearn.metrics import roc_auc_score

    if len(y) == 0 or len(set(y.tolist())) < 2:
        return None
    return float(roc_auc_score(y, s))


def fit_logistic(X: np.ndarray, y: np.ndarray, c: float) -> tuple[np.ndarray, float, np.ndarray, np.ndarray]:
    """(weights in the standardised space, bias, mean, scale): score(x) = ((x - mean) / scale) @ w + b."""
    from sklearn.linear_model import LogisticRegression

    mu, sd = X.mean(0), X.std(0) + 1e-6
    clf = LogisticRegression(C=c, max_iter=3000).fit((X - mu) / sd, y)
    return clf.coef_[0], float(clf.intercept_[0]), mu, sd


def _score(X: np.ndarray, probe: tuple[np.ndarray, float, np.ndarray, np.ndarray]) -> np.ndarray:
    w, b, mu, sd = probe
    return np.asarray(((X - mu) / sd) @ w + b)


def raw_direction(probe: tuple[np.ndarray, float, np.ndarray, np.ndarray]) -> np.ndarray:
    """The logistic probe's direction in activation space (w / scale), unit norm."""
    w, _, _, sd = probe
    d = w / sd
    return np.asarray(d / (np.linalg.norm(d) + 1e-12))


def tpr_at_fpr(val_neg: np.ndarray, test: np.ndarray, y: np.ndarray, fpr: float) -> dict[str, float | None]:
    """Threshold at the (1 - fpr) quantile of the validation negatives; the test's TPR and actual FPR there."""
    if len(val_neg) == 0 or len(y) == 0:
        return {"threshold": None, "tpr": None, "fpr": None}
    thr = float(np.quantile(val_neg, 1 - fpr))
    pos, neg = test[y == 1], test[y == 0]
    return {"threshold": thr, "tpr": float((pos > thr).mean()) if len(pos) else None,
            "fpr": float((neg > thr).mean()) if len(neg) else None}  # fmt: skip


def probe_battery(acts: np.ndarray, items: list[Item], cfg: ProbeConfig) -> dict[str, Any]:
    """acts [n_items, n_layers, d] in `items` order. Per-layer curves, the best layer (by validation AUROC of the
    logistic probe), its figures and controls, and its direction (unit, activation space) for features/steering."""
    rng = np.random.default_rng(cfg.seed)
    y = np.array([it.label for it in items])
    split = np.array([it.split for it in items])
    pair = np.array([it.pair for it in items])
    topic = np.array([it.topic for it in items])
    tr, va, te, tf = (split == s for s in ("train", "val", "test", "transfer"))
    # seen-topic control: half the train pairs (both sides kept together) against the other half
    train_pairs = np.unique(pair[tr])
    half = set(rng.permutation(train_pairs)[: len(train_pairs) // 2].tolist())
    in_a = tr & np.array([p in half for p in pair])
    in_b = tr & ~in_a
    # topic readout: two halves of the train topics (pairs are topic-matched: the concept is balanced in each)
    ttopics = np.unique(topic[tr])
    tgroup = set(rng.permutation(ttopics)[: len(ttopics) // 2].tolist())
    y_topic = np.array([t in tgroup for t in topic]).astype(int)
    # shuffled control: random labels, half of each class each (uncorrelated with the concept on the train split
    # by construction; a plain permutation keeps a chance correlation that a strong concept direction amplifies)
    y_shuf = y.copy()
    for cls in (0, 1):
        idx = rng.permutation(np.nonzero(tr & (y == cls))[0])
        y_shuf[idx[: len(idx) // 2]], y_shuf[idx[len(idx) // 2 :]] = 1, 0
    L = acts.shape[1]
    curves: dict[str, list[float | None]] = {k: [] for k in (
        "val", "test", "transfer", "diff_means_test", "shuffled_test", "seen_topics", "topic_readout")}  # fmt: skip
    probes = []
    for layer in range(L):
        X = acts[:, layer]
        p = fit_logistic(X[tr], y[tr], cfg.c)
        probes.append(p)
        s = _score(X, p)
        curves["val"].append(auroc(y[va], s[va]))
        curves["test"].append(auroc(y[te], s[te]))
        curves["transfer"].append(auroc(y[tf], s[tf]))
        dm = X[tr][y[tr] == 1].mean(0) - X[tr][y[tr] == 0].mean(0)
        curves["diff_means_test"].append(auroc(y[te], X[te] @ dm))
        ps = fit_logistic(X[tr], y_shuf[tr], cfg.c)
        curves["shuffled_test"].append(auroc(y[te], _score(X[te], ps)))
        pa = fit_logistic(X[in_a], y[in_a], cfg.c)
        curves["seen_topics"].append(auroc(y[in_b], _score(X[in_b], pa)))
        a_idx = tr & np.array([p_ in half for p_ in pair])  # topic probe: fit on one half of the pairs
        pt = fit_logistic(X[a_idx], y_topic[a_idx], cfg.c)
        curves["topic_readout"].append(auroc(y_topic[in_b], _score(X[in_b], pt)))
    val = [v if v is not None else -1.0 for v in curves["val"]]
    best = int(np.argmax(val))
    X = acts[:, best]
    s = _score(X, probes[best])
    at = tpr_at_fpr(s[va & (y == 0)], s[te], y[te], cfg.fpr)
    within = [auroc(y[te & (topic == t)], s[te & (topic == t)]) for t in np.unique(topic[te])]
    within_ok = [w for w in within if w is not None]
    result: dict[str, Any] = {
        "layer": best,
        "val": curves["val"][best],
        "test": curves["test"][best],
        "transfer": curves["transfer"][best],
        "diff_means_test": curves["diff_means_test"][best],
        "shuffled_test": curves["shuffled_test"][best],
        "seen_topics": curves["seen_topics"][best],
        "topic_readout": curves["topic_readout"][best],
        "within_topic_test": float(np.mean(within_ok)) if within_ok else None,
        "at_fpr": {"fpr_target": cfg.fpr, **at},
        "curves": curves,
        "n": {s_: int((split == s_).sum()) for s_ in ("train", "val", "test", "transfer")},
    }
    result["validity"] = validity(result)
    result["_direction"] = raw_direction(probes[best])
    result["_probe"] = probes[best]
    return result


def _chance(v: float | None) -> bool:
    return v is None or CHANCE_BAND[0] <= v <= CHANCE_BAND[1]


def validity(r: dict[str, Any]) -> dict[str, Any]:
    """A light with every reason: established (green), weak (amber) or not established (grey)."""
    test, transfer, shuf, seen = r["test"], r["transfer"], r["shuffled_test"], r["seen_topics"]
    reasons: list[str] = []
    fmt = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
    reasons.append(f"test AUROC on unseen topics {fmt(test)} at layer {r['layer']} (chosen on validation, "
                   f"{fmt(r['val'])})")  # fmt: skip
    if transfer is not None:
        reasons.append(f"held-out template family {fmt(transfer)}")
    reasons.append(f"shuffled-label control {fmt(shuf)}" + (" (at chance)" if _chance(shuf) else " (NOT at chance)"))
    reasons.append(f"seen-topic control {fmt(seen)}; topic readout {fmt(r['topic_readout'])}")
    if test is None or test < WEAK:
        why = "no linear readout of the concept on unseen topics"
        if seen is not None and seen >= ESTABLISHED:
            why = "it reads the training topics' cues, not the concept: high on seen topics, chance on unseen ones"
        return {"light": "not established", "colour": "grey", "why": why, "reasons": reasons}
    if not _chance(shuf):
        why = (f"even a probe on random labels separates the unseen topics ({fmt(shuf)}): the concept dominates this "
               "layer's variance (a surface difference such as the wording of an instruction) or the split leaks, so "
               "the probe's reading cannot be told from that")  # fmt: skip
        return {"light": "not established", "colour": "grey", "why": why, "reasons": reasons}
    first = (r.get("curves") or {}).get("test", [None])[0]
    if first is not None and first >= LEXICAL:
        reasons.append(f"layer 0 (the token embeddings) already separates it: {fmt(first)}")
        why = "read from the words themselves (layer 0 already separates it): a surface cue, not evidence of more"
        return {"light": "weak", "colour": "amber", "why": why, "reasons": reasons}
    if test >= ESTABLISHED and (transfer is None or transfer >= TRANSFER_OK):
        why = "read on unseen topics and a held-out phrasing, controls at chance"
        return {"light": "established", "colour": "green", "why": why, "reasons": reasons}
    why = "read on unseen topics, but weakly" if test < ESTABLISHED else "does not transfer to the held-out phrasing"
    return {"light": "weak", "colour": "amber", "why": why, "reasons": reasons}
