"""Matching two dictionaries' features from a score matrix S [m_a, m_b] (decoder cosine or activation correlation).

The matrix arrives in blocks of rows (`(start, block)` pairs, float32), so only one block is held at a time unless a
one-to-one matching needs all of it. From the blocks this module keeps, for every feature of either side, its `top`
best partners on the other side (A→B row-wise, B→A column-wise), and then matches:

- `hungarian`: one-to-one, the assignment that maximises the summed score (scipy's `linear_sum_assignment`); with
  widths m_a ≠ m_b, min(m_a, m_b) pairs and the rest of the wider side unmatched. Needs the whole matrix.
- `many`: many-to-one, each feature of the wider dictionary (B when the widths are equal) to its best partner in the
  narrower one; a narrower feature that receives two or more partners above the threshold is *split*.

`summarize` turns a matching into the figures of a report: per side, the max score's mean and quantiles, the
fraction of features whose best partner scores at least the threshold, and the fraction whose partner *in the
matching* does. Features known to be silent (no activation on the shared tokens) are left out of every figure.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

import numpy as np

from lmscope.errors import MatchError

MODES = ("hungarian", "many")
QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)


@dataclass(frozen=True)
class MatchConfig:
    """How two dictionaries are matched. Change one setting with `dataclasses.replace`.

    mode: `hungarian` (one-to-one) or `many` (many-to-one, the wider dictionary onto the narrower).
    threshold: a partner counts when its score (cosine or correlation) is at least this.
    top: best partners kept per feature and direction in the report (what the explorer lists).
    seed: the baseline's random rotation (decoder cosine) or token permutation (activation correlation).
    block_mb: memory of one block of score rows (float64 cross sums for correlations); bounds what a width costs.
    hungarian_max: the largest m_a x m_b a one-to-one matching accepts (it holds the whole float32 matrix and
      takes roughly cubic time); above it, use `many`.
    """

    mode: Literal["hungarian", "many"] = "hungarian"
    threshold: float = 0.7
    top: int = 3
    seed: int = 0
    block_mb: int = 256
    hungarian_max: int = 1 << 28

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise MatchError(f"mode must be 'hungarian' or 'many', got {self.mode!r}")
        if not -1.0 <= self.threshold <= 1.0:
            raise MatchError(f"threshold must lie in [-1, 1] (a cosine or a correlation), got {self.threshold}")
        if self.top < 1 or self.block_mb < 1 or self.hungarian_max < 1:
            raise MatchError("top, block_mb and hungarian_max must be positive")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MatchConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise MatchError(f"unknown match setting(s) {unknown}; known: {sorted(known)}")
        return cls(**data)


def block_rows(m_b: int, cfg: MatchConfig, bytes_per: int = 8) -> int:
    """Rows of a score block of width m_b that fit in `cfg.block_mb` (at least one)."""
    return max(1, (cfg.block_mb << 20) // (bytes_per * max(1, m_b)))


@dataclass
class Matching:
    """The result of matching A [m_a] with B [m_b]: the top partners both ways and the matching itself.

    top_a [m_a, top] ids in B (best first) with scores top_a_s; top_b likewise. `pairs_a[i]` lists A-feature i's
    partners in the matching (ids in B) and `pairs_a_s` their scores; `pairs_b` likewise (a narrower feature under
    `many` can have several)."""

    mode: str
    top_a: np.ndarray
    top_a_s: np.ndarray
    top_b: np.ndarray
    top_b_s: np.ndarray
    pairs_a: list[list[int]]
    pairs_a_s: list[list[float]]
    pairs_b: list[list[int]]
    pairs_b_s: list[list[float]]

    @property
    def wide(self) -> str:
        """Which side is mapped onto the other under `many` ("b" when the widths are equal)."""
        return "a" if len(self.top_a) > len(self.top_b) else "b"


def _merge_top(ids: np.ndarray, vals: np.ndarray, new_ids: np.ndarray, new_vals: np.ndarray, k: int) -> tuple:
    """Row-wise union of two top-k lists, best first (ties keep the lower id)."""
    all_ids = np.concatenate([ids, new_ids], axis=1)
    all_vals = np.concatenate([vals, new_vals], axis=1)
    order = np.lexsort((all_ids, -all_vals), axis=1)[:, :k]
    return np.take_along_axis(all_ids, order, 1), np.take_along_axis(all_vals, order, 1)


def _top_of(block: np.ndarray, k: int, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """The k largest entries along `axis` (ids, values), best first; ties broken by the lower index."""
    mat = block if axis == 1 else block.T
    k = min(k, mat.shape[1])
    if k < mat.shape[1]:
        part = np.argpartition(-mat, k - 1, axis=1)[:, :k]
    else:
        part = np.broadcast_to(np.arange(mat.shape[1]), mat.shape).copy()
    vals = np.take_along_axis(mat, part, 1)
    order = np.lexsort((part, -vals), axis=1)
    return np.take_along_axis(part, order, 1), np.take_along_axis(vals, order, 1)


def match_blocks(blocks: Iterable[tuple[int, np.ndarray]], m_a: int, m_b: int, cfg: MatchConfig) -> Matching:
    """Match from row blocks of S (each `(first row, float32 [rows, m_b])`, covering every row once)."""
    if cfg.mode == "hungarian" and m_a * m_b > cfg.hungarian_max:
        raise MatchError(
            f"a one-to-one (hungarian) matching of {m_a:,} x {m_b:,} features needs the whole "
            f"{m_a * m_b * 4 / 2**30:.1f} GiB score matrix (limit hungarian_max={cfg.hungarian_max:,} entries); "
            "use --mode many, which streams"
        )
    k = cfg.top
    top_a = np.zeros((m_a, min(k, m_b)), dtype=np.int64)
    top_a_s = np.zeros((m_a, min(k, m_b)), dtype=np.float32)
    kb = min(k, m_a)
    top_b = np.zeros((m_b, 0), dtype=np.int64)
    top_b_s = np.zeros((m_b, 0), dtype=np.float32)
    full = np.empty((m_a, m_b), dtype=np.float32) if cfg.mode == "hungarian" else None
    seen = 0
    for start, block in blocks:
        block = np.nan_to_num(np.asarray(block, dtype=np.float32), nan=0.0)
        rows = block.shape[0]
        ids, vals = _top_of(block, k, axis=1)
        top_a[start : start + rows], top_a_s[start : start + rows] = ids, vals
        cids, cvals = _top_of(block, kb, axis=0)
        top_b, top_b_s = _merge_top(top_b, top_b_s, cids + start, cvals, kb)
        if full is not None:
            full[start : start + rows] = block
        seen += rows
    if seen != m_a:
        raise MatchError(f"internal: the score blocks covered {seen} of {m_a} rows")
    pairs_a: list[list[int]] = [[] for _ in range(m_a)]
    pairs_a_s: list[list[float]] = [[] for _ in range(m_a)]
    pairs_b: list[list[int]] = [[] for _ in range(m_b)]
    pairs_b_s: list[list[float]] = [[] for _ in range(m_b)]
    if full is not None:
        from scipy.optimize import linear_sum_assignment

        rows_i, cols_j = linear_sum_assignment(full, maximize=True)
        for i, j in zip(rows_i.tolist(), cols_j.tolist(), strict=True):
            s = float(full[i, j])
            pairs_a[i], pairs_a_s[i], pairs_b[j], pairs_b_s[j] = [j], [s], [i], [s]
    else:
        wide_is_a = m_a > m_b
        src_top, src_s = (top_a, top_a_s) if wide_is_a else (top_b, top_b_s)
        src_pairs, src_pairs_s = (pairs_a, pairs_a_s) if wide_is_a else (pairs_b, pairs_b_s)
        dst_pairs, dst_pairs_s = (pairs_b, pairs_b_s) if wide_is_a else (pairs_a, pairs_a_s)
        for i in range(len(src_top)):
            j, s = int(src_top[i, 0]), float(src_s[i, 0])
            src_pairs[i], src_pairs_s[i] = [j], [s]
            dst_pairs[j].append(i)
            dst_pairs_s[j].append(s)
        for j in range(len(dst_pairs)):  # strongest partner first
            if len(dst_pairs[j]) > 1:
                ranked = sorted(zip(dst_pairs_s[j], dst_pairs[j], strict=True), key=lambda p: (-p[0], p[1]))
                dst_pairs_s[j] = [s for s, _i in ranked]
                dst_pairs[j] = [i for _s, i in ranked]
    return Matching(cfg.mode, top_a, top_a_s, top_b, top_b_s, pairs_a, pairs_a_s, pairs_b, pairs_b_s)


def _side(top_s: np.ndarray, pairs_s: list[list[float]], mask: np.ndarray | None, t: float) -> dict[str, Any]:
    best = top_s[:, 0].astype(np.float64) if top_s.shape[1] else np.zeros(len(top_s))
    matched = np.array([max(p) if p else -np.inf for p in pairs_s], dtype=np.float64)
    if mask is not None:
        best, matched = best[mask], matched[mask]
    n = len(best)
    if n == 0:
        return {"scored": 0, "mean_max": None, "quantiles": {}, "frac_max_above": None, "frac_matched_above": None,
                "mean_matched": None}  # fmt: skip
    has = np.isfinite(matched)
    return {
        "scored": n,
        "mean_max": round(float(best.mean()), 4),
        "quantiles": {f"p{round(100 * q)}": round(float(np.quantile(best, q)), 4) for q in QUANTILES},
        "frac_max_above": round(float((best >= t).mean()), 4),
        "frac_matched_above": round(float((matched >= t).mean()), 4),
        "mean_matched": round(float(matched[has].mean()), 4) if has.any() else None,
    }


def splitting(m: Matching, mask_narrow: np.ndarray | None, t: float) -> dict[str, Any]:
    """Under `many`: how many narrower features receive 0, 1, 2, 3+ partners scoring at least `t`."""
    pairs_s = m.pairs_a_s if m.wide == "b" else m.pairs_b_s
    counts = np.array([sum(s >= t for s in p) for p in pairs_s])
    if mask_narrow is not None:
        counts = counts[mask_narrow]
    hist = {"0": int((counts == 0).sum()), "1": int((counts == 1).sum()), "2": int((counts == 2).sum()),
            "3+": int((counts >= 3).sum())}  # fmt: skip
    n = max(1, len(counts))
    return {"narrow": "a" if m.wide == "b" else "b", "partners_above": hist, "split": hist["2"] + hist["3+"],
            "frac_split": round((hist["2"] + hist["3+"]) / n, 4),
            "mean_partners_above": round(float(counts.mean()), 4) if len(counts) else None}  # fmt: skip


def summarize(m: Matching, t: float, alive_a: np.ndarray | None = None, alive_b: np.ndarray | None = None) -> dict:
    """The report's figures of one matching at threshold `t`; `alive_*` masks leave silent features out."""
    out: dict[str, Any] = {
        "a": _side(m.top_a_s, m.pairs_a_s, alive_a, t),
        "b": _side(m.top_b_s, m.pairs_b_s, alive_b, t),
    }
    if m.mode == "many":
        out["splitting"] = splitting(m, alive_a if m.wide == "b" else alive_b, t)
    out["same_index"] = same_index(m)
    return out


def same_index(m: Matching) -> float:
    """The fraction of matched pairs that join feature i of A with feature i of B. Two independently initialised
    dictionaries match in a random order (about 1/width by chance); far more means a shared initialisation (the same
    seed, or a narrower dictionary drawn as the first rows of a wider one), which the match then partly measures."""
    pairs = [(i, j) for i, p in enumerate(m.pairs_a) for j in p]
    return round(sum(i == j for i, j in pairs) / len(pairs), 4) if pairs else 0.0


def per_feature(m: Matching, side: str) -> dict[str, Any]:
    """One side's partners as JSON lists: top ids and scores, and the matching's partners (scores to 4 places)."""
    top, top_s, pairs, pairs_s = (
        (m.top_a, m.top_a_s, m.pairs_a, m.pairs_a_s) if side == "a" else (m.top_b, m.top_b_s, m.pairs_b, m.pairs_b_s)
    )
    return {
        "top_ids": top.tolist(),
        "top_scores": np.round(top_s.astype(np.float64), 4).tolist(),
        "matched_ids": pairs,
        "matched_scores": [[round(s, 4) for s in p] for p in pairs_s],
    }
