"""Corpora: streaming readers (`open_corpus`) and tokenisation into fixed-length contexts (`ContextPacker`)."""

from lmscope.corpora.packing import ContextBatch, ContextPacker, PackingConfig, special_token_ids
from lmscope.corpora.readers import (
    Corpus,
    CorpusError,
    CorpusStats,
    HFDatasetCorpus,
    JsonlCorpus,
    ParquetCorpus,
    StdlibCorpus,
    TextCorpus,
    decode_bytes,
    expand_paths,
    open_corpus,
)

__all__ = [
    "ContextBatch",
    "ContextPacker",
    "Corpus",
    "CorpusError",
    "CorpusStats",
    "HFDatasetCorpus",
    "JsonlCorpus",
    "PackingConfig",
    "ParquetCorpus",
    "StdlibCorpus",
    "TextCorpus",
    "decode_bytes",
    "expand_paths",
    "open_corpus",
    "special_token_ids",
]
