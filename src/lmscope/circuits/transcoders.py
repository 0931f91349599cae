"""A set of per-layer transcoders (`blocks.i.mlp_in` -> `blocks.i.mlp_out`) that replaces every MLP of a model.

A set is a directory with one lmscope dictionary per layer (as `lmscope transcoders` or `lmscope train --hook-out`
write them) and, when `lmscope transcoders` wrote it, `transcoders.json` with the model, layers and figures. It is
checked against the model it is used with: every layer present once, hooks `blocks.i.mlp_in` -> `blocks.i.mlp_out`,
widths equal to the model's, and the model spec the transcoders were trained on, when they recorded one.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lmscope.dictionaries.base import Dictionary
from lmscope.dictionaries.formats import CONFIG, load_dictionary
from lmscope.dictionaries.sparse_decode import sparse_decode
from lmscope.errors import CircuitError
from lmscope.model.adapter import Model

MANIFEST = "transcoders.json"
_IN = re.compile(r"^blocks\.(\d+)\.mlp_in$")


@dataclass
class SparseActs:
    """The active features of one layer on one prompt: padded to `k` per position (value 0 where unused)."""

    idx: Tensor  # [n, k] long: feature ids
    val: Tensor  # [n, k] float: activations (>= 0 for the supported architectures; 0 marks padding)


def atlas_name(layer: int) -> str:
    """The file name of layer `layer`'s atlas in a directory of per-layer atlases."""
    return f"layer{layer:02d}.db"


def is_transcoder_set(directory: str | Path) -> bool:
    """Whether `directory` is a set of per-layer dictionaries rather than one dictionary."""
    d = Path(directory)
    if (d / MANIFEST).is_file():
        return True
    return d.is_dir() and not (d / CONFIG).is_file() and any((p / CONFIG).is_file() for p in d.iterdir() if p.is_dir())


class TranscoderSet:
    """Transcoders by layer, one per block of the model, checked against it."""

    def __init__(
        self, by_layer: dict[int, Dictionary], source: str = "<in-memory>", info: dict[str, Any] | None = None
    ):
        if not by_layer:
            raise CircuitError(f"{source}: no transcoders found")
        self.by_layer = dict(sorted(by_layer.items()))
        self.source = source
        self.info = info or {}
        self.paths: dict[int, Path] = {}
        self.also_for: set[str] = set()  # model specs they are knowingly applied to besides their own (fine-tunes)
        for layer, d in self.by_layer.items():
            if not d.cfg.is_transcoder:
                raise CircuitError(f"{source}: the dictionary for layer {layer} is an autoencoder, not a transcoder")

    def applied_to(self, spec: str) -> TranscoderSet:
        """The same transcoders, knowingly used on another model (a fine-tune of the one they were trained on, as a
        circuit diff does); widths and hooks are still checked."""
        out = TranscoderSet(self.by_layer, self.source, self.info)
        out.paths, out.also_for = dict(self.paths), {*self.also_for, spec}
        return out

    @property
    def layers(self) -> list[int]:
        return list(self.by_layer)

    def __getitem__(self, layer: int) -> Dictionary:
        return self.by_layer[layer]

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device = "cpu") -> TranscoderSet:
        d = Path(directory)
        if not d.is_dir():
            raise CircuitError(f"{d} is not a directory of transcoders; make one with `lmscope transcoders`")
        info: dict[str, Any] = {}
        if (d / MANIFEST).is_file():
            try:
                info = json.loads((d / MANIFEST).read_text())
            except json.JSONDecodeError as exc:
                raise CircuitError(f"{d / MANIFEST} is not valid JSON ({exc}); rerun `lmscope transcoders`") from exc
        by_layer: dict[int, Dictionary] = {}
        paths: dict[int, Path] = {}
        for sub in sorted(p for p in d.iterdir() if p.is_dir() and (p / CONFIG).is_file()):
            t = load_dictionary(sub, device=device)
            m = _IN.match(t.cfg.hook or "")
            if m is None or t.cfg.hook_out != f"blocks.{m.group(1)}.mlp_out":
                raise CircuitError(
                    f"{sub} maps {t.cfg.hook} -> {t.cfg.hook_out}; a circuit transcoder maps blocks.i.mlp_in -> "
                    "blocks.i.mlp_out (train one with `lmscope transcoders`)"
                )
            layer = int(m.group(1))
            if layer in by_layer:
                raise CircuitError(f"{d} holds two transcoders for layer {layer}; keep one")
            by_layer[layer] = t.eval()
            paths[layer] = sub
        tcs = cls(by_layer, str(d), info)
        tcs.paths = paths
        return tcs

    def path_of(self, layer: int) -> Path:
        if layer not in self.paths:
            raise CircuitError(f"the layer-{layer} transcoder was not loaded from a directory")
        return self.paths[layer]

    @property
    def model_spec(self) -> str | None:
        specs = {t.cfg.model for t in self.by_layer.values() if t.cfg.model}
        return next(iter(specs)) if len(specs) == 1 else None

    def check(self, model: Model, require_all: bool = True) -> None:
        """Refuse transcoders made for another model, hook or width, or a set that leaves an MLP unreplaced."""
        specs = {t.cfg.model for t in self.by_layer.values() if t.cfg.model}
        if len(specs) > 1:
            raise CircuitError(f"{self.source}: the transcoders come from different models {sorted(specs)}")
        if specs and model.spec != "<in-memory>" and specs != {model.spec} and model.spec not in self.also_for:
            raise CircuitError(
                f"{self.source} was trained on {next(iter(specs))!r}, not {model.spec!r}; use transcoders trained on "
                "this model (`lmscope transcoders MODEL ...`)"
            )
        for layer, t in self.by_layer.items():
            if layer >= model.n_layers:
                raise CircuitError(f"{self.source}: a transcoder for layer {layer}, but the model has {model.n_layers}")
            for name, width in ((t.cfg.hook, t.cfg.d_in), (t.cfg.hook_out, t.cfg.d_out)):
                assert name is not None
                if model.resolve(name) and width != model.d_model:
                    raise CircuitError(
                        f"{self.source}: the layer-{layer} transcoder has width {width} at {name}, the model "
                        f"{model.d_model}; these transcoders belong to another model"
                    )
        missing = [i for i in range(model.n_layers) if i not in self.by_layer]
        if require_all and missing:
            raise CircuitError(
                f"{self.source} has no transcoder for layers {missing}: an attribution graph replaces every MLP, so "
                "train the missing ones (`lmscope transcoders MODEL --layers all`)"
            )

    @torch.no_grad()
    def encode(self, layer: int, x: Tensor) -> SparseActs:
        """Active features of `x` [n, d] at `layer`, at most k per position for TopK, else every non-zero one."""
        t = self.by_layer[layer]
        z = t.encode(x.to(t.W_enc.device, torch.float32))
        k = max(1, int((z != 0).sum(-1).max())) if z.numel() else 1
        val, idx = z.topk(k, dim=-1)
        return SparseActs(idx=idx.cpu(), val=val.cpu())

    def skip(self, layer: int, x: Tensor) -> Tensor:
        """A skip-transcoder's affine term x @ W_skip at `layer` (zeros for a plain transcoder)."""
        t = self.by_layer[layer]
        if not t.cfg.skip:
            return torch.zeros(*x.shape[:-1], int(t.cfg.d_out or t.cfg.d_in), dtype=x.dtype, device=x.device)
        return (x.float() @ t.W_skip.detach().to(x.device)).to(x.dtype)

    def decode(self, layer: int, acts: SparseActs) -> Tensor:
        """Reconstruction [n, d] from sparse acts (b_dec included)."""
        t = self.by_layer[layer]
        w = t.W_dec.detach()
        return sparse_decode(acts.val.to(w.device), acts.idx.to(w.device), w) + t.b_dec.detach()
