"""Activation harvesting into a resumable, verifiable on-disk store (see `job` for the layout)."""

from lmscope.harvest.format import (
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
from lmscope.harvest.job import HarvestConfig, forward_batch, harvest, identity_diff

__all__ = [
    "FORMAT",
    "MANIFEST",
    "SHARD_FMT",
    "CorruptShardError",
    "HarvestConfig",
    "HarvestError",
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
