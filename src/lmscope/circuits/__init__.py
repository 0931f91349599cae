"""Circuits: attribution graphs through per-layer transcoders, on the real model with attention and norms frozen."""

from lmscope.circuits.attribute import AttributionConfig, attribute
from lmscope.circuits.graph import Graph, prune, scores
from lmscope.circuits.replacement import Recording, Replacement, record
from lmscope.circuits.transcoders import TranscoderSet

__all__ = [
    "AttributionConfig", "Graph", "Recording", "Replacement", "TranscoderSet", "attribute", "prune", "record", "scores",
]  # fmt: skip
