"""Token contexts that several models read alike: the first N contexts of a corpus, with their special positions.

Used where two models must see exactly the same tokens (a model diff, an audit's backdoor scan): one document per
context (`truncate`: chat prompts stay whole and separate) or documents packed end to end (`pack`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from lmscope.corpora.packing import ContextPacker, PackingConfig
from lmscope.corpora.readers import CorpusError, open_corpus
from lmscope.model.adapter import Model


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
        raise CorpusError(f"n_contexts must be positive, got {n_contexts}")
    if mode not in ("truncate", "pack"):
        raise CorpusError(f"mode must be 'truncate' or 'pack', got {mode!r}")
    packer = ContextPacker(model.tokenizer, PackingConfig(context=context, mode=mode))  # type: ignore[arg-type]
    toks, spec = [], []
    for batch in packer.contexts(open_corpus(corpus).documents(), 32):
        toks.append(batch.tokens)
        spec.append(batch.special)
        if sum(len(t) for t in toks) >= n_contexts:
            break
    if not toks:
        raise CorpusError(f"the corpus {corpus!r} gave no contexts")
    tokens = torch.from_numpy(np.concatenate(toks)[:n_contexts])
    special = torch.from_numpy(np.concatenate(spec)[:n_contexts].astype(bool))
    return Contexts(tokens, special)
