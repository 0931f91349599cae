"""Behavioural diff: per-token KL(OTHER || BASE) of the next-token distributions over a corpus, and the contexts
where the two models disagree most, each with both models' greedy continuations."""

from __future__ import annotations

from typing import Any

import torch

from lmscope.diff.pair import Contexts
from lmscope.model.adapter import Model
from lmscope.model.generation import greedy_batch


def token_kl(base: Model, other: Model, ctx: Contexts, batch: int = 8) -> torch.Tensor:
    """[n, T] KL(OTHER || BASE) in nats at every position (NaN at special positions)."""
    out = torch.full(ctx.tokens.shape, float("nan"))
    for s, tok, spec in ctx.batches(batch):
        with torch.no_grad():
            lb = base.hf(input_ids=tok.to(base.device)).logits.float().log_softmax(-1).cpu()
            lo = other.hf(input_ids=tok.to(other.device)).logits.float().log_softmax(-1).cpu()
        kl = (lo.exp() * (lo - lb)).sum(-1)
        out[s : s + len(tok)] = torch.where(spec, torch.full_like(kl, float("nan")), kl)
    return out


def behaviour_diff(
    base: Model, other: Model, ctx: Contexts, top: int = 10, continuation: int = 16, batch: int = 8
) -> dict[str, Any]:
    """Mean and quantiles of the per-token KL, and the `top` positions of largest KL (at most one per context, and
    one per distinct prefix), shown as the context up to that token with each model's greedy continuation."""
    kl = token_kl(base, other, ctx, batch)
    valid = kl[~kl.isnan()]
    tok = base.tokenizer
    flat = torch.nan_to_num(kl, nan=-1.0).reshape(-1)
    T = kl.shape[1]
    chosen: list[tuple[int, int, float]] = []
    prefixes: list[str] = []
    for f in flat.argsort(descending=True).tolist():  # largest first; one per context and per distinct prefix
        i, t = divmod(f, T)
        if float(flat[f]) < 0 or len(chosen) == top:
            break
        if any(c == i for c, _, _ in chosen):
            continue
        p = tok.decode(ctx.tokens[i, : t + 1].tolist(), skip_special_tokens=False)
        if p not in prefixes:  # prompts share a system turn: show it once
            chosen.append((i, t, float(flat[f])))
            prefixes.append(p)
    cont_b = greedy_batch(base, prefixes, max_new_tokens=continuation) if prefixes else []
    cont_o = greedy_batch(other, prefixes, max_new_tokens=continuation) if prefixes else []
    rows = []
    for (i, t, v), p, cb, co in zip(chosen, prefixes, cont_b, cont_o, strict=True):
        rows.append({
            "context": i, "position": t, "kl": round(v, 4),
            "token": tok.decode([int(ctx.tokens[i, t])]), "prefix": p[-300:], "base": cb, "other": co,
        })  # fmt: skip
    q = torch.quantile(valid, torch.tensor([0.5, 0.9, 0.99])).tolist() if valid.numel() else [None] * 3
    return {
        "tokens": int(valid.numel()),
        "mean_kl": float(valid.mean()) if valid.numel() else None,
        "median_kl": q[0],
        "p90_kl": q[1],
        "p99_kl": q[2],
        "top": rows,
    }
