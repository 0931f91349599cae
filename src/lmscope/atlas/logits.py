"""Logit effects: which tokens a feature's decoder direction promotes and suppresses through the unembedding.

For a decoder row d (what the feature writes into the residual stream per unit of activation) the direct
effect on the logits is `final_norm(resid + a d) - final_norm(resid)` pushed through `lm_head`. The final
norm divides by the residual's RMS, which depends on the whole residual, so we treat that scale as a
constant (the usual approximation, as in Anthropic's dashboards and sae-dashboard) and keep its per-channel
weight:

    RMSNorm with weight w:          effect = (d * w) @ W_U^T          (Gemma's (1 + w) is handled the same way)
    LayerNorm with weight w:        effect = ((d - mean(d)) * w) @ W_U^T
    no final norm:                  effect = d @ W_U^T

The bias of the norm and of lm_head and any logit softcap are dropped: they do not depend on d, and a softcap
is monotonic. Values are in logits per unit activation, times the unknown constant 1/RMS(resid).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lmscope.model.adapter import Model


@dataclass(frozen=True)
class LogitLens:
    """The per-channel gain of the final norm and the unembedding matrix W_U [vocab, d_model]."""

    gain: Tensor  # [d_model]
    center: bool  # LayerNorm subtracts the mean first
    W_U: Tensor  # [vocab, d_model]


def _norm_gain(norm: nn.Module, d_model: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, bool]:
    if isinstance(norm, nn.LayerNorm):
        w = norm.weight if norm.weight is not None else torch.ones(d_model, device=device, dtype=dtype)
        return w.detach().float(), True
    # An RMSNorm-like module: applied to a vector of ones (RMS 1) it returns its effective per-channel gain,
    # whatever its weight convention (w or 1 + w). Its eps makes this smaller by a factor sqrt(1 + eps); undo it.
    ones = torch.ones(1, d_model, device=device, dtype=dtype)
    with torch.no_grad():
        g = norm(ones).reshape(-1).float()
    eps = float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 0.0)) or 0.0)
    return g * (1.0 + eps) ** 0.5, False


def logit_lens(model: Model) -> LogitLens | None:
    """The model's final norm gain and unembedding, or None if it has no `logits` hook (e.g. an encoder)."""
    if "logits" not in model.hook_points:
        return None
    head = model.hf.get_submodule(model.hook_points["logits"].module)
    W_U = getattr(head, "weight", None)
    if W_U is None or W_U.ndim != 2 or W_U.shape[1] != model.d_model:
        return None
    gain = torch.ones(model.d_model)
    center = False
    if "final_norm" in model.hook_points:
        norm = model.hf.get_submodule(model.hook_points["final_norm"].module)
        gain, center = _norm_gain(norm, model.d_model, model.device, model.dtype)
    return LogitLens(gain=gain.cpu(), center=center, W_U=W_U.detach().float().cpu())


def direct_effects(lens: LogitLens, directions: Tensor) -> Tensor:
    """[n, vocab]: the logit effect of each direction [n, d_model]."""
    d = directions.detach().float().cpu()
    if lens.center:
        d = d - d.mean(-1, keepdim=True)
    return (d * lens.gain) @ lens.W_U.T


def top_logit_effects(
    lens: LogitLens, W_dec: Tensor, k: int = 10, chunk: int = 1024
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """For every decoder row: (pos_values, pos_ids, neg_values, neg_ids), each [d_sae, k]; neg values ascend."""
    k = min(k, lens.W_U.shape[0])
    outs: list[tuple[Tensor, Tensor, Tensor, Tensor]] = []
    for s in range(0, W_dec.shape[0], chunk):
        eff = direct_effects(lens, W_dec[s : s + chunk])
        pv, pi = eff.topk(k, dim=-1)
        nv, ni = eff.topk(k, dim=-1, largest=False)
        outs.append((pv, pi, nv, ni))
    return tuple(torch.cat([o[i] for o in outs]) for i in range(4))  # type: ignore[return-value]
