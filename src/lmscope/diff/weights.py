"""Weight diff: per parameter, how much a fine-tune changed it and in how many directions.

relative change = |W_other - W_base|_F / |W_base|_F; effective rank of the change (matrices only) =
exp(entropy of its normalised singular values) (Roy & Vetterli 2007): 1 for a rank-one update, the full rank for
a change spread evenly over every direction. Rows are reported per module in the model's own parameter names,
largest change first, with a per-layer summary.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from lmscope.errors import DiffError


def effective_rank(delta: torch.Tensor) -> float:
    s = torch.linalg.svdvals(delta.double())
    total = float(s.sum())
    if total <= 0:
        return 0.0
    p = s / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def weight_diff(base: nn.Module, other: nn.Module, svd_max: int = 4096) -> dict[str, Any]:
    """{"modules": [...], "layers": [...], "total_relative": float}; matrices with a side over `svd_max` (the
    embedding) get no effective rank (its SVD would cost more than the rest together)."""
    pb, po = dict(base.named_parameters()), dict(other.named_parameters())
    if set(pb) != set(po):
        missing = sorted(set(pb).symmetric_difference(po))[:4]
        raise DiffError(
            f"the two models have different parameters (e.g. {missing}); diff a model with a fine-tune of it"
        )
    rows = []
    num = den = 0.0
    for name, wb in pb.items():
        wo = po[name]
        if wb.shape != wo.shape:
            raise DiffError(f"{name} has shape {tuple(wb.shape)} in BASE and {tuple(wo.shape)} in OTHER")
        d = (wo.detach().float() - wb.detach().float()).cpu()
        nb, nd = float(wb.detach().float().norm()), float(d.norm())
        num, den = num + nd**2, den + nb**2
        row: dict[str, Any] = {"module": name, "shape": list(wb.shape), "relative": nd / nb if nb > 0 else None}
        if d.ndim == 2 and max(d.shape) <= svd_max:
            row["effective_rank"] = round(effective_rank(d), 2) if nd > 0 else 0.0
            row["max_rank"] = min(d.shape)
        rows.append(row)
    rows.sort(key=lambda r: -(r["relative"] or 0.0))
    layers: dict[int, list[float]] = {}
    for r in rows:
        m = re.search(r"\.(\d+)\.", r["module"])
        if m and r["relative"] is not None:
            layers.setdefault(int(m.group(1)), []).append(r["relative"])
    return {
        "total_relative": (num / den) ** 0.5 if den > 0 else None,
        "modules": rows,
        "layers": [{"layer": i, "mean_relative": sum(v) / len(v)} for i, v in sorted(layers.items())],
    }
