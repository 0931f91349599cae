"""Sparse dictionaries (SAEs and transcoders): one module per architecture behind a registry."""

from lmscope.dictionaries import batchtopk, crosscoder, jumprelu, matryoshka, relu, topk  # noqa: F401  (registers the architectures)
from lmscope.dictionaries.base import (
    DictConfig,
    Dictionary,
    DictionaryError,
    FormatError,
    LossState,
    TrainOutput,
    architecture,
    architectures,
    build,
    register,
)
from lmscope.dictionaries.formats import (
    export_saelens,
    load_dictionary,
    load_saelens,
    load_sparsify,
    save_dictionary,
)
from lmscope.dictionaries.metrics import FVUAccumulator, fvu
from lmscope.dictionaries.sparse_decode import fused_topk, sparse_decode

__all__ = [
    "DictConfig",
    "Dictionary",
    "DictionaryError",
    "FVUAccumulator",
    "FormatError",
    "LossState",
    "TrainOutput",
    "architecture",
    "architectures",
    "build",
    "export_saelens",
    "fused_topk",
    "fvu",
    "load_dictionary",
    "load_saelens",
    "load_sparsify",
    "register",
    "save_dictionary",
    "sparse_decode",
]
