"""Dossiers for crosscoder latents: density, top examples in context, what the OTHER decoder writes through the
unembedding, the relative norm and Latent Scaling ratios, and a short label from the tokens it fires on."""

from __future__ import annotations

from collections import Counter
from typing import Any

from torch import Tensor

from lmscope.atlas.logits import direct_effects, logit_lens
from lmscope.diff.crosscoder import band
from lmscope.diff.pair import Contexts
from lmscope.model.adapter import Model


def example(tok: Any, ctx: Contexts, c: int, t: int, value: float, width: int = 16) -> dict[str, Any]:
    ids = ctx.tokens[c]
    return {
        "context": c, "position": t, "value": round(value, 4),
        "before": tok.decode(ids[max(0, t - width) : t].tolist()),
        "token": tok.decode([int(ids[t])]),
        "after": tok.decode(ids[t + 1 : t + 5].tolist()),
    }  # fmt: skip


def dossiers(
    other: Model,
    z: Tensor,
    where: Tensor,
    ctx: Contexts,
    W_dec: Tensor,
    latents: list[int],
    extra: dict[int, dict[str, Any]],
    n_examples: int = 8,
) -> list[dict[str, Any]]:
    """One dossier per latent. `z` [N, d_sae] dense latents of the pairs at `where` [N, 2] (context, position);
    W_dec [d_sae, 2 d]; `extra` per latent: figures to include (relative norm, scaling...)."""
    tok = other.tokenizer
    lens = logit_lens(other)
    half = W_dec.shape[1] // 2
    out = []
    for j in latents:
        col = z[:, j]
        active = col > 0
        vals, idx = col.topk(min(n_examples * 50, int(active.sum())))
        exs: list[dict[str, Any]] = []
        seen: set[tuple[str, str, str]] = set()
        for v, i in zip(vals.tolist(), idx.tolist(), strict=True):  # identical snippets shown once
            e = example(tok, ctx, int(where[i, 0]), int(where[i, 1]), v)
            if (e["before"], e["token"], e["after"]) not in seen:
                seen.add((e["before"], e["token"], e["after"]))
                exs.append(e)
            if len(exs) == n_examples:
                break
        top_tokens = Counter(e["token"].strip() or repr(e["token"]) for e in exs).most_common(3)
        d: dict[str, Any] = {
            "latent": j,
            "density": float(active.float().mean()),
            "max_activation": float(col.max()) if col.numel() else 0.0,
            "label": "fires on " + ", ".join(f"'{t}'" for t, _ in top_tokens) if top_tokens else "never fires",
            "examples": exs,
            **extra.get(j, {}),
        }
        if "relative_norm" in d:
            d["band"] = band(d["relative_norm"])
        if lens is not None:
            eff = direct_effects(lens, W_dec[j, half:][None].float())[0]
            d["promotes"] = [tok.decode([int(t)]) for t in eff.topk(8).indices]
            d["suppresses"] = [tok.decode([int(t)]) for t in eff.topk(8, largest=False).indices]
        out.append(d)
    return out
