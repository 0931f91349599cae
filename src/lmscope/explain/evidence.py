"""What an explainer and a scorer see of one feature: its atlas examples split into an explain half and a held-out
half, and non-activating windows as negatives.

The split is deterministic: examples are ordered by (kind, bin, rank) and alternate between the halves, so both
halves hold top and quantile examples. Negatives are windows from atlas contexts that are *not* among the
feature's examples, at seeded random positions. The atlas stores no activations outside the examples, so a
negative context may still contain a weak firing that was not sampled; for sparse features this is rare, for
dense ones it makes every score a lower bound (docs/explain.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lmscope.atlas.db import read
from lmscope.atlas.db.schema import Connection
from lmscope.explain.positions import PositionTable
from lmscope.explain.syntax import Annotated


def median(x: list[int] | np.ndarray) -> float:
    """float(np.median(x)) of integers, exactly (without numpy's overhead, which counts for short lists): the
    middle value, or the mean of the two middle ones."""
    s = sorted(x.tolist() if isinstance(x, np.ndarray) else x)
    n = len(s)
    return float(s[n // 2]) if n % 2 else (float(s[n // 2 - 1]) + float(s[n // 2])) / 2


@dataclass
class Window:
    """A run of tokens with the feature's activation on each (zeros for negatives)."""

    context: int
    start: int  # context position of the first token
    token_ids: list[int]
    tokens: list[str]
    acts: np.ndarray  # float32, one per token
    kind: str  # top | quantile | negative
    bin: int = -1
    peak: int = -1  # index of the example token in the window (-1 for negatives)

    @property
    def act(self) -> float:
        return float(self.acts.max()) if len(self.acts) else 0.0

    def active(self, frac: float = 0.0) -> np.ndarray:
        """Indices of tokens whose activation is > 0 and >= frac * this window's peak."""
        if not len(self.acts) or self.act <= 0:
            return np.zeros(0, dtype=np.int64)
        return np.nonzero((self.acts > 0) & (self.acts >= frac * self.act))[0]


@dataclass
class FeatureEvidence:
    feature: int
    max_act: float
    density: float
    explain: list[Window]
    held_out: list[Window]
    explain_negatives: list[Window] = field(default_factory=list)
    held_out_negatives: list[Window] = field(default_factory=list)


class AtlasEvidence:
    """Reads examples and contexts from an open atlas connection (read-only use; one thread at a time)."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.vocab: list[str] = read.vocab_texts(conn)
        self.context_ids: list[int] = read.context_ids(conn)
        self._ctx: dict[int, np.ndarray] = {}
        self._freq: np.ndarray | None = None
        self._kinds: dict[int, tuple[list[str], list[str], list[str], list[str]]] = {}
        self._lists: dict[int, tuple[list[int], list[str]]] = {}
        self._positions: PositionTable | None = None
        from lmscope.atlas.db.schema import get_meta
        from lmscope.atlas.store import SPECIAL_TEXT

        recorded = (get_meta(conn, "provenance") or {}).get("special_token_ids")
        if not isinstance(recorded, list):  # an atlas built before the ids were recorded: read the texts
            recorded = [i for i, t in enumerate(self.vocab) if SPECIAL_TEXT.fullmatch(t)]
        ids = recorded
        self.special_texts = frozenset(self.text(int(i)) for i in ids)

    def text(self, tid: int) -> str:
        return self.vocab[tid] if 0 <= tid < len(self.vocab) else f"<id {tid}>"

    def context(self, cid: int) -> np.ndarray:
        if cid not in self._ctx:
            toks = read.context_tokens(self.conn, cid)
            self._ctx[cid] = toks.astype(np.int64) if toks is not None else np.zeros(0, np.int64)
        return self._ctx[cid]

    def _lists_of(self, cid: int) -> tuple[list[int], list[str]]:
        """A context's token ids and texts as lists (cached): windows are slices of them."""
        got = self._lists.get(cid)
        if got is None:
            ids = self.context(cid).tolist()
            got = self._lists[cid] = (ids, [self.text(t) for t in ids])
        return got

    def annotations(self, cid: int) -> tuple[list[str], list[str], list[str], list[str]]:
        """(texts, context kinds, syntax classes, documents) of every token of a context (cached)."""
        from lmscope.explain.syntax import classify_context, classify_syntax

        if cid not in self._kinds:
            texts = self._lists_of(cid)[1]
            kinds = classify_context(texts)
            sources = [""] * len(texts)
            for s, name in read.context_sources(self.conn, cid):
                sources[s:] = [name] * (len(texts) - s)
            self._kinds[cid] = (texts, kinds, classify_syntax(texts, kinds), sources)
        return self._kinds[cid]

    def positions(self) -> PositionTable:
        """Every stored context annotated once, as columns (explain_stats and rule_score read windows there)."""
        if self._positions is None:
            self._positions = PositionTable(((c, *self.annotations(c)) for c in self.context_ids),
                                            self.special_texts)  # fmt: skip
        return self._positions

    def kinds(self, w: Window) -> Annotated:
        """The annotations of `w` (syntax.Annotated): context kind, syntax class and document of each token,
        classified over its whole context, with the context's tokens just before and after the window."""
        from lmscope.explain.rules import LINE_LOOKBACK

        texts, kinds, syntax, sources = self.annotations(w.context)
        a, b = w.start, w.start + len(w.tokens)
        return Annotated(kinds[a:b], syntax[a:b], sources[a:b], texts[max(0, a - LINE_LOOKBACK) : a], texts[b : b + 1],
                         self.special_texts)  # fmt: skip

    def promoted(self, feature: int, n: int = 10) -> list[str]:
        """The texts of the `n` tokens the feature's decoder direction promotes most (its positive logit effects)."""
        row = read.feature_row(self.conn, feature)
        if row is None or not row["logits"]:
            return []
        import json

        return [self.text(int(t)) for t, _v in json.loads(row["logits"]).get("positive", [])[:n]]

    def token_freq(self) -> np.ndarray:
        """Relative frequency of each token id over every context stored in the atlas (position 0 excluded)."""
        if self._freq is None:
            counts = np.zeros(max(1, len(self.vocab)), dtype=np.float64)
            for _cid, toks in read.iter_contexts(self.conn):
                ids = toks[1:]
                ids = ids[(ids >= 0) & (ids < len(counts))]
                counts += np.bincount(ids, minlength=len(counts))
            self._freq = counts / max(1.0, counts.sum())
        return self._freq

    def live_features(self) -> list[int]:
        return read.live_feature_ids(self.conn)

    def windows(self, feature: int, rows: list[tuple[Any, ...]] | None = None) -> list[Window]:
        """The feature's examples as windows (`rows`: its read.example_windows rows, if already read)."""
        out = []
        for kind, b, _rank, ctx, pos, start, blob in rows if rows is not None else read.example_windows(
                self.conn, feature):  # fmt: skip
            acts = np.frombuffer(blob, dtype="<f4").copy()
            ids, texts = self._lists_of(int(ctx))
            a, e = int(start), int(start) + len(acts)
            out.append(Window(int(ctx), int(start), ids[a:e], texts[a:e], acts, kind, int(b), int(pos) - int(start)))
        return out

    def negatives(self, exclude: set[int], n: int, length: int, before: int, seed: int) -> list[Window]:
        """`n` windows of `length` tokens from contexts not in `exclude`, at seeded positions (never position 0)."""
        pool = [c for c in self.context_ids if c not in exclude]
        if not pool or n <= 0:
            return []
        rng = np.random.default_rng(seed)
        picks = rng.choice(len(pool), size=min(n, len(pool)), replace=False)
        got = [(pool[int(i)], *self._lists_of(pool[int(i)])) for i in picks]
        got = [g for g in got if len(g[1]) >= 2]
        # one draw per kept pick, in order: the same numbers as drawing them one at a time
        ps = rng.integers(1, np.array([len(toks) for _, toks, _ in got], dtype=np.int64)).tolist() if got else []
        out = []
        for (cid, toks, texts), p in zip(got, ps, strict=True):
            s = max(1, p - before)
            e = min(len(toks), s + length)
            ids = toks[s:e]
            out.append(Window(cid, s, ids, texts[s:e], np.zeros(len(ids), np.float32), "negative"))
        return out

    def evidence(self, feature: int, negatives_per_positive: float = 2.0, min_negatives: int = 10,
                 seed: int = 0) -> FeatureEvidence:  # fmt: skip
        row = read.feature_max_density(self.conn, feature)
        if row is None:
            from lmscope.explain.ops import ExplainError

            raise ExplainError(
                f"feature {feature} is not in this atlas; features run from 0 to {self.n_features() - 1}"
            )
        return self._evidence(feature, row, self.windows(feature), negatives_per_positive, min_negatives, seed)

    def evidence_many(self, features: list[int], negatives_per_positive: float = 2.0, min_negatives: int = 10,
                      seed: int = 0) -> list[FeatureEvidence]:  # fmt: skip
        """`evidence(f)` for each of `features` (in that order), read with two queries instead of two a feature."""
        rows = read.example_windows_many(self.conn, features)
        stats = read.max_density_many(self.conn, features)
        missing = [f for f in features if f not in stats]
        if missing:
            from lmscope.explain.ops import ExplainError

            raise ExplainError(f"feature(s) {missing[:5]} are not in this atlas; features run from 0 to "
                               f"{self.n_features() - 1}")  # fmt: skip
        return [self._evidence(f, stats[f], self.windows(f, rows.get(f, [])), negatives_per_positive, min_negatives,
                               seed) for f in features]  # fmt: skip

    def _evidence(self, feature: int, row: tuple[float, float], wins: list[Window], negatives_per_positive: float,
                  min_negatives: int, seed: int) -> FeatureEvidence:  # fmt: skip
        explain, held = wins[0::2], wins[1::2]
        length = int(median([len(w.tokens) for w in wins])) if wins else 16
        before = int(median([w.peak for w in wins])) if wins else length // 2
        exclude = {w.context for w in wins}
        n_neg = max(min_negatives, round(negatives_per_positive * max(len(explain), len(held))))
        negs = self.negatives(exclude, 2 * n_neg, length, before, seed=seed * 1_000_003 + int(feature))
        return FeatureEvidence(int(feature), float(row[0]), float(row[1]), explain, held, negs[0::2], negs[1::2])

    def n_features(self) -> int:
        return read.count_features(self.conn)


def evidence_summary(ev: FeatureEvidence) -> dict[str, Any]:
    return {"explain": len(ev.explain), "held_out": len(ev.held_out), "explain_negatives": len(ev.explain_negatives),
            "held_out_negatives": len(ev.held_out_negatives)}  # fmt: skip
