"""Batch sources: an `ActivationStore` adapted to the trainer's `BatchSource` protocol (`__iter__`, widths, norms)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lmscope.activations.store import ActivationStore


class StoreSource:
    """Shuffled batches of a harvest directory for the trainer: `{hook: Tensor[batch, width]}` per step."""

    def __init__(self, directory: Path, hooks: list[str] | None, batch_size: int, seed: int, epochs: int) -> None:
        self.store = ActivationStore.open(directory, hooks=hooks)
        self.batch_size, self.seed, self.epochs = batch_size, seed, epochs
        self.mean_norm = self.store.mean_norms()
        self.widths: dict[str, int] = dict(self.store.widths)
        self.model = self.store.manifest.get("model_spec") or self.store.manifest.get("model")

    def __iter__(self) -> Iterator[Any]:
        return self.store.batches(batch_size=self.batch_size, seed=self.seed, epochs=self.epochs, drop_last=True)
