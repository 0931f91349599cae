"""Tiny models with random per-layer transcoders, and graphs built from them, for the circuit tests."""

from __future__ import annotations

from pathlib import Path

import torch

from lmscope import Model
from lmscope.circuits import AttributionConfig, TranscoderSet, attribute
from lmscope.circuits.export import to_neuronpedia, write_neuronpedia
from lmscope.dictionaries.base import DictConfig, build
from tiny_models import TINY, tiny_ids

CIRCUIT_FAMILIES = ["gemma", "gemma2", "gemma3", "gpt2", "gpt_neox", "gpt_neox_sequential", "llama", "olmo2", "qwen2",
                    "qwen3", "smollm3"]  # fmt: skip


def tiny_transcoders(
    model: Model, d_sae: int = 64, k: int = 4, arch: str = "topk", skip: bool = False
) -> TranscoderSet:
    """Random transcoders at every layer, with non-zero biases so constant terms are exercised."""
    d = model.d_model
    by_layer = {}
    for i in range(model.n_layers):
        cfg = DictConfig(arch=arch, d_in=d, d_sae=d_sae, d_out=d, k=k, hook=f"blocks.{i}.mlp_in",
                         hook_out=f"blocks.{i}.mlp_out", skip=skip)  # fmt: skip
        t = build(cfg, seed=100 + i)
        g = torch.Generator().manual_seed(7 + i)
        with torch.no_grad():
            t.b_dec.copy_(torch.randn(d, generator=g) * 0.5)
            t.b_enc.copy_(torch.randn(d_sae, generator=g) * 0.1)
            if skip:
                t.W_skip.copy_(torch.randn(d, d, generator=g) * 0.2)
        by_layer[i] = t.eval()
    return TranscoderSet(by_layer)


def tiny_circuit(
    family: str = "llama", n: int = 10, skip: bool = False, **cfg: object
) -> tuple[Model, TranscoderSet, torch.Tensor, object]:
    hf = TINY[family].build()
    model = Model(hf)
    tcs = tiny_transcoders(model, skip=skip)
    ids = tiny_ids()[0][:n]
    config = AttributionConfig(**{"max_feature_nodes": None, "max_edges_per_row": None, **cfg})  # type: ignore[arg-type]
    return model, tcs, ids, attribute(model, tcs, ids, config)


def write_tiny_graph_json(directory: Path, slug: str = "tiny-graph") -> Path:
    """A Neuronpedia-format graph JSON of a tiny llama, for the explorer's graph view."""
    _, _, _, graph = tiny_circuit("llama")
    doc = to_neuronpedia(graph, slug, node_threshold=0.9, edge_threshold=0.98)  # type: ignore[arg-type]
    directory.mkdir(parents=True, exist_ok=True)
    return write_neuronpedia(doc, directory / f"{slug}.json")
