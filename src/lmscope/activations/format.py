"""On-disk format of an activation store: constants, errors, manifest reading, checksums and `verify`."""

from __future__ import annotations

import hashlib
import json
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from lmscope.core.checksums import file_sha256
from lmscope.errors import LmscopeError
from lmscope.model.adapter import Model

FORMAT = "lmscope.activations"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SHARD_FMT = "shard_{:05d}.safetensors"
ROW_FIELDS = ("tokens", "document", "position", "special")
STORE_DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float32": torch.float32,
    "fp32": torch.float32,
}
DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}


class HarvestError(LmscopeError):
    """A harvest could not start, resume or finish."""


class CorruptShardError(HarvestError):
    """A shard on disk does not match the checksum its manifest recorded."""


def storage_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        if name not in DTYPE_NAMES:
            raise HarvestError(f"cannot store activations as {name}; use float16, bfloat16 or float32")
        return name
    try:
        return STORE_DTYPES[name]
    except KeyError:
        raise HarvestError(f"unknown storage dtype {name!r}: use float16 (fp16), bfloat16 (bf16) or float32") from None


_FINGERPRINTS: weakref.WeakKeyDictionary[torch.nn.Module, str] = weakref.WeakKeyDictionary()


def model_fingerprint(model: Model) -> str:
    """sha256 over every parameter and buffer (names, dtypes, shapes, bytes); cached per model object."""
    cached = _FINGERPRINTS.get(model.hf)
    if cached:
        return cached
    h = hashlib.sha256()
    for name, t in sorted(model.hf.state_dict().items()):
        t = t.detach().reshape(-1).contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{t.numel()}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    _FINGERPRINTS[model.hf] = digest = h.hexdigest()
    return digest


def read_manifest(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise HarvestError(f"{directory} holds no {MANIFEST}: it is not an lmscope activation store")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CorruptShardError(f"{path} is not valid JSON ({exc}); the store cannot be read") from exc
    if manifest.get("format") != FORMAT:
        raise HarvestError(f"{path} is not an lmscope activation manifest (format {manifest.get('format')!r})")
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise HarvestError(f"{path} was written by a newer lmscope (format {manifest['format_version']}); upgrade")
    return manifest


def mean_norms(shards: list[dict[str, Any]], hooks: list[str], special: bool = False) -> dict[str, float]:
    """Mean L2 norm per hook over the given shards' rows (non-special rows unless `special`)."""
    key, count = ("norm_sum_all", "rows") if special else ("norm_sum", "rows_kept")
    n = sum(s[count] for s in shards)
    if n == 0 and not special:
        return mean_norms(shards, hooks, special=True)
    return {h: (sum(s[key][h] for s in shards) / n if n else 0.0) for h in hooks}


@dataclass
class VerifyReport:
    directory: Path
    checked: int = 0
    problems: list[str] = field(default_factory=list)
    bad_shards: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def check_shard(directory: Path, shard: dict[str, Any], checksum: bool = True) -> str | None:
    """None if the shard file is present and matches the manifest, else what is wrong with it."""
    path = directory / shard["file"]
    if not path.is_file():
        return f"{shard['file']}: missing"
    size = path.stat().st_size
    if size != shard["bytes"]:
        return f"{shard['file']}: {size} bytes on disk, {shard['bytes']} in the manifest (truncated or replaced)"
    if checksum and file_sha256(path) != shard["sha256"]:
        return f"{shard['file']}: checksum mismatch (the file is corrupt)"
    return None


def verify(directory: str | Path, progress: Callable[[int, int], None] | None = None) -> VerifyReport:
    """Recheck every shard listed in the manifest against its recorded size and sha256."""
    d = Path(directory)
    manifest = read_manifest(d)
    report = VerifyReport(d)
    shards = manifest.get("shards", [])
    for i, shard in enumerate(shards):
        problem = check_shard(d, shard)
        report.checked += 1
        if problem:
            report.problems.append(problem)
            report.bad_shards.append(shard["file"])
        if progress:
            progress(i + 1, len(shards))
    listed = {s["file"] for s in shards}
    extra = sorted(p.name for p in d.glob("shard_*.safetensors") if p.name not in listed)
    if extra:
        report.notes.append(f"not in the manifest (left by an interrupted run; resuming overwrites): {extra}")
    if not manifest.get("complete"):
        report.notes.append("the harvest is incomplete; rerun its command to resume: " + manifest.get("command", ""))
    return report


def load_shard(path: str | Path, names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Every (or the named) tensor of one shard file, fully read."""
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in (names or list(f.keys()))}
