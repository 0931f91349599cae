"""Activations: resumable, verifiable harvesting to disk (`harvest`, `format`), the `ActivationStore` that every
later stage reads, and batch sources for the trainer (`sources`)."""

from lmscope.activations.format import (
    FORMAT,
    MANIFEST,
    SHARD_FMT,
    CorruptShardError,
    HarvestError,
    VerifyReport,
    check_shard,
    file_sha256,
    load_shard,
    mean_norms,
    model_fingerprint,
    read_manifest,
    storage_dtype,
    verify,
)
from lmscope.activations.harvest import HarvestConfig, forward_batch, harvest, identity_diff
from lmscope.activations.sources import StoreSource
from lmscope.activations.store import ActivationStore

__all__ = [
    "FORMAT",
    "MANIFEST",
    "SHARD_FMT",
    "ActivationStore",
    "CorruptShardError",
    "HarvestConfig",
    "HarvestError",
    "StoreSource",
    "VerifyReport",
    "check_shard",
    "file_sha256",
    "forward_batch",
    "harvest",
    "identity_diff",
    "load_shard",
    "mean_norms",
    "model_fingerprint",
    "read_manifest",
    "storage_dtype",
    "verify",
]
