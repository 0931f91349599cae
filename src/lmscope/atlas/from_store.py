"""An atlas build that reads its activations from a harvested store (`lmscope harvest`) instead of running the
model: the batches of contexts are the store's rows in order (row r is position r % context of context
r // context), so the build sees the same contexts, special tokens and document indices as one that tokenises the
corpus itself, and the model is used only for its tokenizer, unembedding and hash. The activations are the
store's, in its dtype (float16 by default), so the latents differ from a model-run build's by that rounding.

The store must come from the same model (weights hash), corpus (fingerprint), context length and packing, hold the
dictionary's hook (and a transcoder's output hook), and cover the tokens asked for; otherwise the build stops with
the reason and the fix.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lmscope.activations.format import model_fingerprint
from lmscope.activations.store import ActivationStore
from lmscope.atlas.config import AtlasConfig
from lmscope.atlas.db.schema import AtlasError
from lmscope.corpora import ContextBatch, Corpus, PackingConfig
from lmscope.model.adapter import Model


def _packing(p: PackingConfig | dict[str, Any] | None) -> dict[str, Any]:
    """The settings that decide the token ids (a harvest manifest records only those)."""
    return (p if isinstance(p, PackingConfig) else PackingConfig.from_dict(p or {})).to_dict()


class StoreActivations:
    """The batches of an atlas build read from a harvest directory, checked against the build's inputs."""

    def __init__(self, directory: str | Path, model: Model, corpus: Corpus, hooks: list[str], cfg: AtlasConfig):
        self.directory = Path(directory)
        self.store = ActivationStore.open(self.directory, hooks=hooks, exclude_special=False)
        m = self.store.manifest
        fix = f"harvest them again from this model and corpus, or build without activations={str(directory)!r}"
        if m.get("model", {}).get("hash") != model_fingerprint(model):
            raise AtlasError(f"the activations in {directory} were harvested from another model than {model.spec}; "
                             f"{fix}")  # fmt: skip
        if int(m["context"]) != cfg.context:
            raise AtlasError(f"the activations in {directory} are in contexts of {m['context']} tokens, the atlas "
                             f"asks for {cfg.context}; pass --context {m['context']}")  # fmt: skip
        if _packing(m.get("packing")) != _packing(cfg.packing):
            raise AtlasError(f"the activations in {directory} were packed with {_packing(m.get('packing'))}, the "
                             f"atlas asks for {_packing(cfg.packing)}; pass the same packing settings")  # fmt: skip
        if m.get("corpus", {}).get("fingerprint") != corpus.fingerprint():
            raise AtlasError(f"the activations in {directory} come from another corpus than {corpus.describe()}; "
                             f"{fix}")  # fmt: skip
        self.hooks = hooks
        self.corpus = corpus
        self.context = cfg.context
        self.batch_size = cfg.batch_size
        have = sum(int(s["rows"]) for s in m["shards"]) // cfg.context
        want = math.ceil(cfg.tokens / cfg.context)
        if have < want and not (m.get("complete") and m.get("corpus", {}).get("exhausted")):
            raise AtlasError(
                f"the activations in {directory} cover {have * cfg.context:,} tokens, the atlas asks for "
                f"{want * cfg.context:,}; pass --tokens {have * cfg.context} or harvest more"
            )
        self.n_contexts = min(have, want)
        self._shard: dict[str, Tensor] | None = None
        self._shard_index = -1
        self._names: Iterator[str] | None = None

    def describe(self) -> dict[str, Any]:
        """What the provenance records about the store."""
        m = self.store.manifest
        return {"path": str(self.directory.resolve()), "dtype": m.get("dtype"), "model_hash": m["model"]["hash"],
                "created": m.get("created")}  # fmt: skip

    def _rows(self, a: int, b: int) -> dict[str, Tensor]:
        """Rows a..b-1 of the store (hooks, tokens, document, position, special), read shard by shard."""
        parts: list[dict[str, Tensor]] = []
        for i, s in enumerate(self.store.manifest["shards"]):
            lo, hi = int(s["first_row"]), int(s["first_row"]) + int(s["rows"])
            if hi <= a or lo >= b:
                continue
            if i != self._shard_index:
                self._shard = self.store.read_shard(i, [*self.hooks, "tokens", "document", "position", "special"])
                self._shard_index = i
            assert self._shard is not None
            parts.append({k: v[max(a, lo) - lo : min(b, hi) - lo] for k, v in self._shard.items()})
        return {k: torch.cat([p[k] for p in parts]) if len(parts) > 1 else parts[0][k] for k in parts[0]}

    def batches(self) -> Iterator[tuple[ContextBatch, dict[str, Tensor]]]:
        """(contexts, {hook: activations [B, C, width]}) of the build, `batch_size` contexts at a time."""
        C = self.context
        for first in range(0, self.n_contexts, self.batch_size):
            n = min(self.batch_size, self.n_contexts - first)
            rows = self._rows(first * C, (first + n) * C)
            batch = ContextBatch(
                rows["tokens"].numpy().astype(np.int64).reshape(n, C),
                rows["document"].numpy().astype(np.int64).reshape(n, C),
                rows["position"].numpy().astype(np.int32).reshape(n, C),
                rows["special"].numpy().astype(bool).reshape(n, C),
            )
            self._read_names(batch.document)
            yield batch, {h: rows[h].reshape(n, C, -1) for h in self.hooks}

    def _read_names(self, document: np.ndarray) -> None:
        """Read the corpus (not tokenising it) up to the documents of `document`, so that `corpus.names` names
        them (the build's context sources)."""
        if not self.corpus.record_names:
            return
        if self._names is None:
            self._names = iter(self.corpus.documents())
        need = int(document.max()) + 1 if document.size else 0
        while len(self.corpus.names) < need and next(self._names, None) is not None:
            pass
