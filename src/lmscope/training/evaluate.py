"""Evaluating a dictionary: reconstruction metrics on activations, and the model's loss with it spliced in.

Metrics on activations x (target y; y = x for autoencoders):
  fvu            sum |y - y_hat|^2 / sum |y - mean(y)|^2   (lmscope.dictionaries.metrics, streamed in float64)
  mse            mean over tokens and dimensions of (y - y_hat)^2
  l0             mean number of active latents per token
  dead_frac      fraction of latents that never fired on the evaluation tokens
  density_hist   counts of log10(firing frequency) in unit bins from -8 to 0 (+ the dead ones)
  cosine         mean cosine similarity between y_hat and y per token
  rel_bias       relative reconstruction bias E|y_hat|^2 / E[y_hat . y] (1 is unbiased, < 1 shrinkage)

Spliced into the model (model.intervene replaces the hook activation by the reconstruction):
  ce_clean, ce_spliced, ce_spliced_with_error (reconstruction + error term: equals clean up to rounding),
  ce_zero_ablate, ce_recovered = (ce_zero_ablate - ce_spliced) / (ce_zero_ablate - ce_clean),
  kl_spliced, kl_spliced_with_error: mean KL(clean || spliced) of the next-token distributions.
For a transcoder (hook -> hook_out) the reconstruction of hook_out from hook replaces hook_out.
Special tokens (BOS/EOS/pad, when a `special` mask is given) keep their own activation in spliced runs.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from lmscope.core.atomic import atomic_write_bytes
from lmscope.corpora import ContextPacker, CorpusError, PackingConfig, open_corpus
from lmscope.dictionaries.base import Dictionary, DictionaryError
from lmscope.dictionaries.metrics import FVUAccumulator
from lmscope.model.adapter import Model

HIST_BINS = list(range(-8, 1))  # bin edges of log10 firing frequency


@torch.no_grad()
def activation_metrics(d: Dictionary, x: Tensor, y: Tensor | None = None, chunk: int = 8192) -> dict[str, Any]:
    """Reconstruction metrics of `d` on activations x [..., d_in] (and targets y for transcoders)."""
    x = x.reshape(-1, x.shape[-1])
    y = x if y is None else y.reshape(-1, y.shape[-1])
    if x.shape[-1] != d.cfg.d_in or y.shape[-1] != d.cfg.d_out:
        raise DictionaryError(
            f"the dictionary maps {d.cfg.d_in} -> {d.cfg.d_out} dims but the activations are "
            f"{x.shape[-1]} -> {y.shape[-1]}; evaluate it on the hook it was trained on ({d.cfg.hook})"
        )
    dev = d.W_enc.device
    n = x.shape[0]
    err = FVUAccumulator()
    cos = dot = rec2 = l0 = 0.0
    fired = torch.zeros(d.cfg.d_sae, dtype=torch.float64)
    for s in range(0, n, chunk):
        xb = x[s : s + chunk].to(dev, torch.float32)
        yb = xb if y is x else y[s : s + chunk].to(dev, torch.float32)
        recon, z = d(xb)
        active = z > 0
        err.update(yb, recon)
        cos += float(F.cosine_similarity(recon, yb, dim=-1).double().sum())
        dot += float((recon.double() * yb.double()).sum())
        rec2 += float(recon.double().pow(2).sum())
        l0 += float(active.sum())
        fired += active.sum(0).double().cpu()
    density = fired / n
    live = density[density > 0]
    hist = torch.histc(live.log10().float(), bins=len(HIST_BINS) - 1, min=HIST_BINS[0], max=HIST_BINS[-1])
    return {
        "tokens": n,
        "fvu": err.value(),
        "mse": err.sse / (n * y.shape[-1]),
        "l0": l0 / n,
        "dead_frac": float((density == 0).double().mean()),
        "cosine": cos / n,
        "rel_bias": rec2 / dot if dot != 0 else math.nan,
        "density_hist": {
            "log10_bin_edges": HIST_BINS,
            "counts": [int(c) for c in hist.tolist()],
            "dead": int((density == 0).sum()),
        },
    }


def next_token_ce(logits: Tensor, ids: Tensor) -> Tensor:
    """Mean next-token cross-entropy of logits [n, seq, vocab] on ids [n, seq]."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten().to(logits.device))


def next_token_kl(clean: Tensor, other: Tensor) -> Tensor:
    """Mean KL(clean || other) of the next-token distributions, over the positions the CE counts."""
    p = clean[:, :-1].float().log_softmax(-1)
    q = other[:, :-1].float().log_softmax(-1)
    return (p.exp() * (p - q)).sum(-1).mean()


@torch.no_grad()
def splice_metrics(
    model: Model, d: Dictionary, ids: Tensor, batch: int = 8, special: Tensor | None = None
) -> dict[str, float]:
    """CE loss and KL with the dictionary spliced into `model` at its hook, over token ids [n_seq, seq_len].

    With `special` ([n_seq, seq_len] bool), BOS/EOS/pad positions keep their own activation in the spliced
    and the zero-ablated runs alike (the usual convention: dictionaries are not trained on those outliers,
    and the BOS position serves as an attention sink for every later token).
    """
    hook_in = d.cfg.hook
    hook_out = d.cfg.hook_out if d.cfg.is_transcoder else hook_in
    if not hook_in or not hook_out:
        raise DictionaryError("the dictionary's config names no hook; set d.cfg.hook (and hook_out for transcoders)")
    model.resolve(hook_in)
    model.resolve(hook_out)
    ids = ids.unsqueeze(0) if ids.ndim == 1 else ids
    if ids.shape[1] < 2:
        raise DictionaryError("splice metrics need sequences of at least 2 tokens (next-token loss)")
    dev = d.W_enc.device
    sums: dict[str, float] = {}
    n_batches = 0

    def recon_of(x: Tensor) -> Tensor:
        return d(x.to(dev, torch.float32))[0].to(x.device, x.dtype)

    for s in range(0, ids.shape[0], batch):
        b = ids[s : s + batch]
        keep = None if special is None else special[s : s + batch].bool().unsqueeze(-1)

        def only_ordinary(new: Tensor, x: Tensor, keep: Tensor | None = keep) -> Tensor:
            return new if keep is None else torch.where(keep.to(x.device), x, new)

        clean = model(b)
        assert clean is not None
        stash: dict[str, Tensor] = {}

        def run_with(write: Callable[[Tensor], Tensor], b: Tensor = b, stash: dict[str, Tensor] = stash) -> Tensor:
            if hook_in == hook_out:
                with model.intervene({hook_out: write}):
                    out = model(b)
            else:  # transcoder: read the input hook during the same forward pass that rewrites the output hook
                with model.capture([hook_in], stop_early=False) as acts, model.intervene({hook_out: write}):
                    stash.clear()
                    stash["acts"] = acts  # type: ignore[assignment]
                    out = model(b)
            assert out is not None
            return out

        def source(x: Tensor, stash: dict[str, Tensor] = stash) -> Tensor:
            return stash["acts"][hook_in] if hook_in != hook_out else x  # type: ignore[index]

        spliced = run_with(lambda x: only_ordinary(recon_of(source(x)), x))
        with_err = run_with(lambda x: recon_of(source(x)) + (x - recon_of(source(x))))
        zero = run_with(lambda x: only_ordinary(torch.zeros_like(x), x))
        values = {
            "ce_clean": next_token_ce(clean, b),
            "ce_spliced": next_token_ce(spliced, b),
            "ce_spliced_with_error": next_token_ce(with_err, b),
            "ce_zero_ablate": next_token_ce(zero, b),
            "kl_spliced": next_token_kl(clean, spliced),
            "kl_spliced_with_error": next_token_kl(clean, with_err),
        }
        for k, v in values.items():
            sums[k] = sums.get(k, 0.0) + float(v)
        n_batches += 1
    out = {k: v / n_batches for k, v in sums.items()}
    gap = out["ce_zero_ablate"] - out["ce_clean"]
    out["ce_recovered"] = (out["ce_zero_ablate"] - out["ce_spliced"]) / gap if gap != 0 else math.nan
    return out


@torch.no_grad()
def evaluate(d: Dictionary, model: Model, ids: Tensor, batch: int = 8, special: Tensor | None = None) -> dict[str, Any]:
    """Every metric: activations harvested from `model` on `ids` at the dictionary's hook(s), then the splice.

    `special` ([n, context] bool) marks BOS/EOS/pad positions: their activation norms are huge outliers
    that dictionaries are not trained on, so the activation metrics leave them out and the splice keeps the
    model's own activation there (the CE is still measured at every position).
    """
    hooks = [h for h in (d.cfg.hook, d.cfg.hook_out if d.cfg.is_transcoder else None) if h]
    if not hooks:
        raise DictionaryError("the dictionary's config names no hook; set d.cfg.hook (and hook_out for transcoders)")
    ids = ids.unsqueeze(0) if ids.ndim == 1 else ids
    xs: list[Tensor] = []
    ys: list[Tensor] = []
    for s in range(0, ids.shape[0], batch):
        with model.capture(hooks) as acts:
            model(ids[s : s + batch])
        xs.append(acts[hooks[0]].float().cpu())
        ys.append(acts[hooks[-1]].float().cpu())
    x, y = torch.cat(xs), torch.cat(ys)
    if special is not None:
        keep = ~special.reshape(special.shape[0] if special.ndim > 1 else 1, -1).bool()
        x, y = x[keep], y[keep]
    results = activation_metrics(d, x, y if len(hooks) == 2 else None)
    results.update(splice_metrics(model, d, ids, batch, special=special))
    results["hook"] = d.cfg.hook
    if d.cfg.is_transcoder:
        results["hook_out"] = d.cfg.hook_out
    return results


def save_json(results: dict[str, Any], path: str | Path) -> None:
    atomic_write_bytes(Path(path), (json.dumps(results, indent=2) + "\n").encode())


def eval_contexts(
    model: Model, corpus: str, tokens: int, context: int = 128, skip_tokens: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, special) [n, context] for `tokens` tokens of the corpus after skipping `skip_tokens`."""
    packer = ContextPacker(model.tokenizer, PackingConfig(context=context))
    n_skip, n_take = skip_tokens // context, max(1, -(-tokens // context))
    rows = list(itertools.islice(packer.rows(open_corpus(corpus).documents()), n_skip, n_skip + n_take))
    if len(rows) < n_take:
        raise CorpusError(
            f"{corpus} has only {(n_skip + len(rows)) * context} tokens; ask for fewer --tokens or --skip-tokens"
        )
    batch = packer.stack(rows)
    return torch.from_numpy(batch.tokens), torch.from_numpy(np.asarray(batch.special))
