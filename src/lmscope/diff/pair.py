"""Two models to compare: the checks that make a comparison meaningful, and the corpus contexts both read.

A diff compares a BASE model with OTHER (a fine-tune, an organism, a checkpoint). Token-level comparisons need
the same tokenizer; activation comparisons need the same width and depth too. `check_pair` refuses a pair that
fails what a part needs, naming the difference and the fix.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from lmscope.corpora import ContextPacker, PackingConfig, open_corpus
from lmscope.errors import DiffError
from lmscope.model.adapter import Model


def check_pair(base: Model, other: Model, widths: bool = True) -> None:
    """Refuse two models whose tokenizers differ (always) or whose widths/depths differ (when `widths`)."""
    tb, to = base.tokenizer, other.tokenizer
    if tb is None or to is None:
        raise DiffError("both models need a tokenizer to be compared on text")
    vb, vo = tb.get_vocab(), to.get_vocab()
    if vb != vo:
        only = sorted(set(vb).symmetric_difference(vo))[:5]
        raise DiffError(
            f"the two models have different tokenizers ({len(vb)} vs {len(vo)} tokens"
            + (f", e.g. {only} in one only" if only else ", same tokens with other ids")
            + "); a diff compares a model with a fine-tune of it: pass two models that share a tokenizer"
        )
    if widths and (base.d_model, base.n_layers) != (other.d_model, other.n_layers):
        raise DiffError(
            f"the two models differ in shape: {base.n_layers} layers x {base.d_model} vs {other.n_layers} layers x "
            f"{other.d_model}; activation diffs and crosscoders need the same architecture (a fine-tune of BASE)"
        )


@dataclass
class Contexts:
    """Token contexts read by both models: tokens [n, T] and which positions are special (padding, BOS...).

    Padding sits at the end of a context (right padding), so under causal attention it changes no real token's
    activations: contexts run without an attention mask, and special positions are left out of every statistic."""

    tokens: Tensor  # int64 [n, T]
    special: Tensor  # bool [n, T]

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def batches(self, size: int) -> Iterable[tuple[int, Tensor, Tensor]]:
        for s in range(0, len(self), size):
            yield s, self.tokens[s : s + size], self.special[s : s + size]


def corpus_contexts(model: Model, corpus: str, n_contexts: int, context: int = 64, mode: str = "truncate") -> Contexts:
    """The first `n_contexts` contexts of a corpus: one document per context (`truncate`, the default: chat
    prompts stay whole and separate) or documents packed end to end (`pack`)."""
    if n_contexts < 1:
        raise DiffError(f"n_contexts must be positive, got {n_contexts}")
    if mode not in ("truncate", "pack"):
        raise DiffError(f"mode must be 'truncate' or 'pack', got {mode!r}")
    packer = ContextPacker(model.tokenizer, PackingConfig(context=context, mode=mode))  # type: ignore[arg-type]
    toks, spec = [], []
    for batch in packer.contexts(open_corpus(corpus).documents(), 32):
        toks.append(batch.tokens)
        spec.append(batch.special)
        if sum(len(t) for t in toks) >= n_contexts:
            break
    if not toks:
        raise DiffError(f"the corpus {corpus!r} gave no contexts")
    tokens = torch.from_numpy(np.concatenate(toks)[:n_contexts])
    special = torch.from_numpy(np.concatenate(spec)[:n_contexts].astype(bool))
    return Contexts(tokens, special)
