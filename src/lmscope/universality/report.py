"""The match report: one JSON file, written atomically, read back checked, and queried per feature.

    {"format": "lmscope.match", "version": 1, "a": {path, sha256, arch, d_sae, hook, model, ...}, "b": {...},
     "config": MatchConfig, "activation_pass": {models, hooks, corpus, tokens, shared_tokens, alignment} | null,
     "methods": {"decoder" | "activation": {"summary", "baseline_summary",
                                            "features": {"a": {top_ids, top_scores, matched_ids, matched_scores},
                                                         "b": {...}},
                                            "silent": {"a": [...], "b": [...]} (activation only)}}}

`side_of` tells which side of a report a dictionary is (by its tensor hash, then by its path), so the explorer can
show an atlas's features with their partners in the other dictionary (`partners`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lmscope.core.atomic import atomic_write_json
from lmscope.errors import MatchError

FORMAT = "lmscope.match"
VERSION = 1


def write_report(report: dict[str, Any], out: str | Path) -> Path:
    """Write the report atomically (a reader sees the old file or the whole new one)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, report, indent=None)
    return out


def load_report(path: str | Path) -> dict[str, Any]:
    """Read a report written by `lmscope match`, refusing anything else with the reason and the fix."""
    p = Path(path)
    if not p.is_file():
        raise MatchError(f"no match report at {p}; write one with `lmscope match A B --out {p}`")
    try:
        report = json.loads(p.read_text())
    except (ValueError, OSError) as exc:
        raise MatchError(f"{p} is not readable JSON ({exc}); rerun `lmscope match`") from None
    if not isinstance(report, dict) or report.get("format") != FORMAT:
        raise MatchError(f"{p} is not an lmscope match report (format {FORMAT!r}); write one with `lmscope match`")
    if int(report.get("version", 0)) > VERSION:
        raise MatchError(f"{p} is a version {report['version']} match report; this lmscope reads up to {VERSION}")
    return report


def side_of(report: dict[str, Any], sha256: str | None, path: str | None) -> str | None:
    """"a" or "b": the side of the report that is this dictionary (its tensor hash, else its resolved path)."""
    for key, value in (("sha256", sha256), ("path", path)):
        if not value:
            continue
        if key == "path":
            value = str(Path(value).resolve())
        for side in ("a", "b"):
            if report.get(side, {}).get(key) == value:
                return side
    return None


def partners(report: dict[str, Any], side: str, fid: int, threshold: float | None = None) -> dict[str, Any]:
    """Feature `fid` of `side`'s partners in the other dictionary, per method: those of the matching (one-to-one:
    at most one; many-to-one: several for a narrower feature) and the best `top` by score, each {id, score, above}."""
    other = "b" if side == "a" else "a"
    t = float(report.get("config", {}).get("threshold", 0.7) if threshold is None else threshold)
    out: dict[str, Any] = {"side": side, "other": report.get(other, {}), "threshold": t,
                           "mode": report.get("config", {}).get("mode"), "methods": {}}  # fmt: skip
    for name, m in report.get("methods", {}).items():
        f = m.get("features", {}).get(side)
        if not f or not 0 <= fid < len(f["top_ids"]):
            continue
        silent = fid in set(m.get("silent", {}).get(side, []))

        def rows(ids: list[int], scores: list[float]) -> list[dict[str, Any]]:
            return [{"id": int(i), "score": float(s), "above": float(s) >= t} for i, s in zip(ids, scores, strict=True)]

        out["methods"][name] = {
            "score": m.get("score"), "silent": silent,
            "matched": [] if silent else rows(f["matched_ids"][fid], f["matched_scores"][fid]),
            "top": [] if silent else rows(f["top_ids"][fid], f["top_scores"][fid]),
            "baseline_frac": (m.get("baseline_summary", {}).get(side) or {}).get("frac_matched_above"),
            "frac": (m.get("summary", {}).get(side) or {}).get("frac_matched_above"),
        }  # fmt: skip
    return out
