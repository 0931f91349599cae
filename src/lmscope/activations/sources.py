"""Batch sources: an `ActivationStore` adapted to the trainer's `BatchSource` protocol (`__iter__`, widths, norms)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from lmscope.activations.store import ActivationStore
from lmscope.corpora import ContextPacker, PackingConfig, open_corpus


class StoreSource:
    """Shuffled batches of a harvest directory for the trainer: `{hook: Tensor[batch, width]}` per step."""

    def __init__(self, directory: Path, hooks: list[str] | None, batch_size: int, seed: int, epochs: int) -> None:
        self.store = ActivationStore.open(directory, hooks=hooks)
        self.batch_size, self.seed, self.epochs = batch_size, seed, epochs
        self.mean_norm = self.store.mean_norms()
        self.widths: dict[str, int] = dict(self.store.widths)
        self.model = self.store.manifest.get("model_spec") or self.store.manifest.get("model")

    def __iter__(self) -> Iterator[Any]:
        # Gathered in the trainer's thread, not a prefetch thread: a batch is one copy from the mapped shards (a few
        # ms on all cores), while a thread working beside the step's multi-threaded kernels stalls them for longer
        # than its work takes (measured: 20 ms a step for 3 ms of gathering on 2 cores; docs/harvest.md).
        return self.store.batches(batch_size=self.batch_size, seed=self.seed, epochs=self.epochs, drop_last=True)


class StreamSource:
    """Batches `{hook: Tensor[batch, width]}` computed from the model on the fly: one pass feeds every hook, and
    nothing is written to disk (training transcoders at every layer would otherwise need 2 x layers stores).

    Rows are the corpus's ordinary (non-special) tokens in order, cut into batches of `batch_size`: batch i is rows
    [i * batch_size, (i + 1) * batch_size). That makes a resume cheap and exact: `iter_from(step)` tokenises its
    way past the first step * batch_size rows (special-token masks come from the packer, not the model) and runs
    the model only from the context that holds the next row. Each batch spans batch_size / context contexts.
    """

    def __init__(
        self,
        model: Any,
        corpus: Any,
        hooks: list[str],
        batch_size: int,
        context: int = 128,
        norm_sample_tokens: int = 16_384,
        batch_contexts: int = 8,
    ) -> None:
        for h in hooks:
            model.resolve(h)
        self.model, self.hooks, self.batch_size, self.context = model, list(hooks), batch_size, context
        self.corpus = open_corpus(corpus)
        self.packer = ContextPacker(model.tokenizer, PackingConfig(context=context))
        self.batch_contexts = batch_contexts
        store = ActivationStore.streaming(
            model, self.corpus, hooks, context=context, norm_sample_tokens=norm_sample_tokens
        )
        self.mean_norm = store.mean_norms()
        self.widths: dict[str, int] = dict(store.widths)
        self.model_spec = getattr(model, "spec", None)

    def __iter__(self) -> Iterator[Any]:
        return self.iter_from(0)

    def iter_from(self, step: int) -> Iterator[Any]:
        skip = step * self.batch_size
        pending: dict[str, list[Any]] = {h: [] for h in self.hooks}
        have = 0
        # grad mode is switched off around the model call only: a generator that yields inside `no_grad` would
        # switch gradients off in the trainer's step too
        with self.model.capture(self.hooks) as acts:
            for batch in self.packer.contexts(self.corpus.documents(), self.batch_contexts):
                keep = torch.from_numpy(~batch.special.reshape(-1).astype(bool))
                n_rows = int(keep.sum())
                if skip >= n_rows:  # wholly before the resume point: tokenised, never run
                    skip -= n_rows
                    continue
                with torch.no_grad():
                    self.model(torch.from_numpy(batch.tokens))
                rows = {h: acts[h].reshape(-1, acts[h].shape[-1])[keep][skip:] for h in self.hooks}
                skip = 0
                for h in self.hooks:
                    pending[h].append(rows[h])
                have += len(rows[self.hooks[0]])
                while have >= self.batch_size:
                    full = {h: torch.cat(pending[h]) for h in self.hooks}
                    yield {h: t[: self.batch_size].float() for h, t in full.items()}
                    pending = {h: [t[self.batch_size :]] for h, t in full.items()}
                    have -= self.batch_size
