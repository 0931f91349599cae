"""Activation diff: per layer, how far OTHER's residual stream moved from BASE's on the same tokens, the
directions it moved along, what those directions say through the unembedding, and where they fire.

For every layer: |mean(a_o - a_b)| and mean |a_o - a_b|, both relative to mean |a_b| (special tokens left out).
At the `direction_layers`: the mean difference (the activation-difference lens) and the top principal directions
of the per-token differences, each read out through the final norm's gain and the unembedding (logit-lens style:
the tokens a direction promotes), and each with the tokens whose difference projects on it most. The tokens with
the largest per-token difference at every layer show where OTHER's internal state jumps: a trigger, typically.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lmscope.atlas.logits import direct_effects, logit_lens
from lmscope.diff.pair import Contexts
from lmscope.model.adapter import Model


def _snippet(tok: Any, ids: Tensor, t: int, width: int = 12) -> dict[str, Any]:
    return {
        "before": tok.decode(ids[max(0, t - width) : t].tolist()),
        "token": tok.decode([int(ids[t])]),
        "after": tok.decode(ids[t + 1 : t + 4].tolist()),
    }


def _top_positions(values: Tensor, ctx: Contexts, tok: Any, k: int) -> list[dict[str, Any]]:
    """The k largest values [n, T] with their context; identical snippets (a system prompt every context repeats)
    are shown once."""
    flat = torch.nan_to_num(values, nan=float("-inf")).reshape(-1)
    m = min(k * 50, int((flat > float("-inf")).sum()))
    vals, idx = flat.topk(m)
    T = values.shape[1]
    out: list[dict[str, Any]] = []
    seen: set[tuple[str, str, str]] = set()
    for v, i in zip(vals.tolist(), idx.tolist(), strict=True):
        if not v > 0:  # nothing changed here (two identical models): no place to show
            break
        snip = _snippet(tok, ctx.tokens[i // T], i % T)
        key = (snip["before"], snip["token"], snip["after"])
        if key in seen:
            continue
        seen.add(key)
        out.append({"context": i // T, "position": i % T, "value": round(v, 4), **snip})
        if len(out) == k:
            break
    return out


def activation_diff(
    base: Model,
    other: Model,
    ctx: Contexts,
    direction_layers: list[int] | None = None,
    n_directions: int = 3,
    top_tokens: int = 10,
    batch: int = 8,
) -> dict[str, Any]:
    L = base.n_layers
    layers = direction_layers if direction_layers is not None else sorted({L // 4, L // 2, (3 * L) // 4})
    hooks = [f"blocks.{i}.resid_post" for i in range(L)]
    n, T = ctx.tokens.shape
    sum_diff = torch.zeros(L, base.d_model, dtype=torch.float64)
    sum_norm_b = torch.zeros(L, dtype=torch.float64)
    sum_norm_d = torch.zeros(L, dtype=torch.float64)
    norms = torch.full((L, n, T), float("nan"))
    kept: dict[int, Tensor] = {i: torch.zeros(n, T, base.d_model, dtype=torch.float16) for i in layers}
    count = 0
    for s, tok, spec in ctx.batches(batch):
        with base.capture(hooks) as ab, torch.no_grad():
            base(tok)
        with other.capture(hooks) as ao, torch.no_grad():
            other(tok)
        keep = ~spec
        count += int(keep.sum())
        for i, h in enumerate(hooks):
            b, o = ab[h].float().cpu(), ao[h].float().cpu()
            d = (o - b) * keep[..., None]
            sum_diff[i] += d.sum((0, 1)).double()
            sum_norm_b[i] += (b.norm(dim=-1) * keep).sum().double()
            dn = d.norm(dim=-1)
            sum_norm_d[i] += dn.sum().double()
            norms[i, s : s + len(tok)] = torch.where(keep, dn, torch.full_like(dn, float("nan")))
            if i in kept:
                kept[i][s : s + len(tok)] = d.half()
    mean_b = sum_norm_b / max(count, 1)
    mean_diff = sum_diff / max(count, 1)
    per_layer = [
        {"layer": i, "mean_diff_norm": float(mean_diff[i].norm() / mean_b[i]),
         "token_diff_norm": float(sum_norm_d[i] / max(count, 1) / mean_b[i]),
         "top_tokens": _top_positions(norms[i] / mean_b[i].float(), ctx, base.tokenizer, top_tokens)}
        for i in range(L)
    ]  # fmt: skip
    lens = logit_lens(base)
    dirs_out = []
    for i in layers:
        X = kept[i].float().reshape(-1, base.d_model)
        valid = ~ctx.special.reshape(-1)
        Xv = X[valid]
        directions = [("mean difference", mean_diff[i].float())]
        if Xv.shape[0] > n_directions + 1 and n_directions > 0:
            _u, _s, v = torch.pca_lowrank(Xv, q=min(n_directions, Xv.shape[1]), center=True)
            directions += [(f"principal direction {j + 1}", v[:, j]) for j in range(v.shape[1])]
        for name, vec in directions:
            unit = vec / vec.norm().clamp_min(1e-12)
            proj = (X @ unit).reshape(n, T)
            proj = torch.where(ctx.special, torch.full_like(proj, float("nan")), proj)
            # a principal direction's sign is arbitrary: orient it so that its largest projections are positive
            if name != "mean difference" and float(proj.nan_to_num(0).min().abs()) > float(proj.nan_to_num(0).max()):
                unit, proj = -unit, -proj
            row: dict[str, Any] = {
                "layer": i,
                "direction": name,
                "top_tokens": _top_positions(proj, ctx, base.tokenizer, top_tokens),
            }
            if lens is not None:
                eff = direct_effects(lens, unit[None])[0]
                row["promotes"] = [base.tokenizer.decode([int(t)]) for t in eff.topk(10).indices]
                row["suppresses"] = [base.tokenizer.decode([int(t)]) for t in eff.topk(10, largest=False).indices]
            dirs_out.append(row)
    return {"tokens": count, "layers": per_layer, "directions": dirs_out}
