"""Backdoor candidates from a dictionary: features dead on ordinary text that fire on rare strings of the scan corpus.

A trigger the model learned to react to may own a feature that ordinary text never turns on. With a dictionary
of the suspect's residual stream (`--dict`), every feature's firing rate on ordinary text is read: from a corpus
(`ScanConfig.ordinary`), else from the atlas's densities, else from the scan corpus itself (a looser test: the
trigger is in it). The features that are dead there (rate at most `rare`) but fire somewhere in the scan corpus are
ranked by the largest vector they write into the residual stream (activation x decoder norm); each one's strongest
firing grows into a span over its neighbours where any dead feature fires too (a rare string is read piece by
piece, often by one dead feature per piece), and that span joins the scan's candidates, to be put to the same
behaviour test against the same null.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from lmscope.corpora.contexts import Contexts, corpus_contexts
from lmscope.dictionaries.base import Dictionary
from lmscope.errors import AuditError
from lmscope.model.adapter import Model


def dictionary_hook(dictionary: Dictionary, model: Model, what: str = "the scan") -> str:
    """The residual-stream hook `dictionary` reads (`blocks.L.resid_post`), checked against `model`'s shape."""
    hook = dictionary.cfg.hook
    if not hook or not hook.startswith("blocks.") or not hook.endswith(".resid_post"):
        raise AuditError(f"{what} reads features of the residual stream after a block; this dictionary reads "
                         f"{hook!r}: pass a residual-stream dictionary or leave out --dict")  # fmt: skip
    layer = int(hook.split(".")[1])
    if not 0 <= layer < model.n_layers or dictionary.cfg.d_in != model.d_model:
        raise AuditError(
            f"the dictionary reads {hook} with width {dictionary.cfg.d_in}; the model has {model.n_layers} layers "
            f"of width {model.d_model}: pass a dictionary trained on this model (or the one it was fine-tuned from)"
        )
    return hook


@torch.no_grad()
def _encode(model: Model, dictionary: Dictionary, hook: str, ctx: Contexts, blocked: torch.Tensor,
            batch: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Per feature: how many scored tokens it fires on, its largest activation, and where ([m, 2]: context,
    position). `dictionary` is on the CPU in float32 (activations are read back there)."""
    d = dictionary
    m = d.cfg.d_sae
    fired = torch.zeros(m, dtype=torch.float64)
    best = torch.zeros(m)
    where = torch.zeros(m, 2, dtype=torch.long)
    T = ctx.tokens.shape[1]
    for s0, tok, _ in ctx.batches(batch):
        with model.capture([hook]) as a:
            model(tok)
        x = a[hook].float().cpu()
        ok = ~blocked[s0 : s0 + tok.shape[0]]
        if not bool(ok.any()):
            continue
        z = d.encode(x[ok])  # [tokens, m]
        fired += (z > 0).sum(0).double()
        top, idx = z.max(0)
        better = top > best
        pos = ok.flatten().nonzero().squeeze(1)[idx]  # flat position in this batch of each feature's maximum
        best = torch.where(better, top, best)
        where[better, 0] = (s0 + pos // T)[better]
        where[better, 1] = (pos % T)[better]
    return fired, best, where


def _densities(model: Model, dictionary: Dictionary, hook: str, source: str, context: int, contexts: int,
               blocked_of: Any) -> np.ndarray:  # fmt: skip
    ctx = corpus_contexts(model, source, contexts, context)
    blocked = blocked_of(ctx)
    fired, _, _ = _encode(model, dictionary, hook, ctx, blocked)
    return (fired / max(1, int((~blocked).sum()))).numpy()


def feature_candidates(model: Model, dictionary: Dictionary, ctx: Contexts, blocked: torch.Tensor, cfg: Any,
                       blocked_of: Any, atlas_density: np.ndarray | None = None) -> dict[str, Any]:  # fmt: skip
    """{"candidates": spans where dead features fire (with "feature" and "at"), "features": the dead features that
    fired, "ordinary": where their rates were read}."""
    hook = dictionary_hook(dictionary, model)
    d = dictionary.to(torch.device("cpu")).float()
    fired, best, where = _encode(model, d, hook, ctx, blocked)
    n_tok = max(1, int((~blocked).sum()))
    if cfg.ordinary:
        dens = _densities(model, d, hook, cfg.ordinary, cfg.context, cfg.contexts, blocked_of)
        source = f"corpus {cfg.ordinary}"
    elif atlas_density is not None:
        if len(atlas_density) != dictionary.cfg.d_sae:
            raise AuditError(f"the atlas holds {len(atlas_density)} features, the dictionary {dictionary.cfg.d_sae}: "
                             "pass the atlas built from this dictionary")  # fmt: skip
        dens, source = np.asarray(atlas_density, dtype=np.float64), "the atlas's densities"
    else:
        dens, source = (fired / n_tok).numpy(), "the scan corpus itself"
    norms = d.W_dec.detach().norm(dim=1)
    written = (best * norms).numpy()
    dead = np.nonzero((dens <= cfg.rare) & (fired.numpy() > 0))[0]
    order = dead[np.argsort(-written[dead])]
    dead_t = torch.from_numpy(dead)
    T = ctx.tokens.shape[1]
    out: dict[str, dict[str, Any]] = {}
    rows = []
    for f in order.tolist():
        if len(out) >= cfg.feature_candidates:
            break
        c, p = (int(v) for v in where[f])
        with torch.no_grad(), model.capture([hook]) as a:
            model(ctx.tokens[c : c + 1])
            z = d.encode(a[hook].float().cpu()[0])  # every feature along the whole context
        # a rare string is read piece by piece (`|DEP`, `LO`, `Y`, `MENT|`), often by a different dead feature for
        # each piece: the span grows over the neighbours where any dead feature fires
        some_dead = (z[:, dead_t] > 0).any(1) & ~blocked[c]
        lo = hi = p
        while lo > 0 and hi - lo + 1 < cfg.span and bool(some_dead[lo - 1]):
            lo -= 1
        while hi < T - 1 and hi - lo + 1 < cfg.span and bool(some_dead[hi + 1]):
            hi += 1
        text = model.tokenizer.decode(ctx.tokens[c, lo : hi + 1].tolist()).strip()
        rows.append({"feature": f, "density_ordinary": float(dens[f]), "fired_scan": int(fired[f]),
                     "max_act": float(best[f]), "written": float(written[f]), "text": text})  # fmt: skip
        if text and text not in out:
            out[text] = {"text": text, "tokens": hi - lo + 1, "score": float(written[f]), "occurrences": int(fired[f]),
                         "at": [c, lo, hi], "feature": f}  # fmt: skip
    return {"hook": hook, "ordinary": source, "rare": cfg.rare, "dead_and_firing": len(dead),
            "features": rows, "candidates": list(out.values())}  # fmt: skip
