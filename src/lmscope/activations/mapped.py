"""A shard of an activation store as tensors that view a read-only memory map of the file: no copy is made.

The shuffled reader (`ActivationStore.batches`) gathers each batch's rows straight from these views, so a row is
copied once on its way from the page cache to a batch instead of being read into a chunk, copied into a shuffle
buffer and moved within it. The file is mapped whole and verified from the same map: its sha256 is taken over
the mapped bytes before any tensor is made, so the bytes that are read are the bytes that were checked.

A safetensors file is an 8-byte little-endian header length, a JSON header giving each tensor's dtype, shape and
byte range, then the data; the header is parsed here (safetensors' own reader copies what it returns).
"""

from __future__ import annotations

import json
import math
import mmap
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from lmscope.activations.format import CorruptShardError
from lmscope.core.checksums import buffer_sha256

_DTYPES: dict[str, torch.dtype] = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "U8": torch.uint8,
}


class MappedShard:
    """`tensors[name]`: read-only views of the named tensors of one safetensors shard.

    The views must only be read (a write to a read-only map is a segmentation fault): `ActivationStore` hands out
    copies, never the views. The map is unmapped when the last view is gone.
    """

    def __init__(self, path: str | Path, names: Sequence[str], sha256: str | None = None, fix: str = "") -> None:
        self.path = Path(path)
        self._map: mmap.mmap | bytearray
        with open(self.path, "rb") as fh:
            try:
                self._map = _map_file(fh.fileno())
            except ValueError:  # an empty file cannot be mapped
                raise CorruptShardError(f"refusing {self.path}: the file is empty. {fix}") from None
            except OSError:  # a file system without mmap: the file is read into memory instead
                self._map = bytearray(self.path.stat().st_size)
                fh.readinto(self._map)
        if sha256 is not None and buffer_sha256(self._map) != sha256:
            raise CorruptShardError(
                f"refusing {self.path}: its checksum does not match the manifest (the file is corrupt). {fix}"
            )
        header, data_start = self._header(fix)
        self.tensors: dict[str, torch.Tensor] = {}
        for name in names:
            self.tensors[name] = self._view(name, header.get(name), data_start, fix)

    def _header(self, fix: str) -> tuple[dict, int]:
        m = self._map
        try:
            n = int.from_bytes(m[:8], "little")
            if not 0 < n <= len(m) - 8:
                raise ValueError(f"a header of {n} bytes in a {len(m)}-byte file")
            header = json.loads(m[8 : 8 + n])
            if not isinstance(header, dict):
                raise ValueError("the header is not a JSON object")
        except (ValueError, UnicodeDecodeError) as exc:
            raise CorruptShardError(f"refusing {self.path}: not a readable safetensors file ({exc}). {fix}") from None
        return header, 8 + n

    def _view(self, name: str, info: object, data_start: int, fix: str) -> torch.Tensor:
        if not isinstance(info, dict):
            raise CorruptShardError(f"refusing {self.path}: it holds no tensor {name!r}. {fix}")
        try:
            dtype = _DTYPES[info["dtype"]]
            shape = [int(s) for s in info["shape"]]
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptShardError(
                f"refusing {self.path}: tensor {name!r} has a bad header entry ({exc}). {fix}"
            ) from None
        size = dtype.itemsize
        count = math.prod(shape)
        start = data_start + begin
        if end - begin != count * size or start + count * size > len(self._map) or begin < 0:
            raise CorruptShardError(
                f"refusing {self.path}: tensor {name!r} claims bytes {begin}-{end} for shape {shape}, which the file "
                f"does not hold. {fix}"
            )
        if count == 0:
            return torch.empty(shape, dtype=dtype)
        with warnings.catch_warnings():  # "the given buffer is not writable": it is only ever read
            warnings.simplefilter("ignore", UserWarning)
            flat = torch.frombuffer(self._map, dtype=torch.uint8, count=count * size, offset=start)
        if start % size:  # safetensors aligns its data; a misaligned tensor is copied rather than viewed
            flat = flat.clone()
        return flat.view(dtype).view(shape)


def _map_file(fileno: int) -> mmap.mmap:
    """The whole file, mapped read-only; on Linux with its page tables filled at once (MAP_POPULATE): the store
    gathers rows all over a shard, and one fault per page touched costs as much as the copy itself."""
    populate = getattr(mmap, "MAP_POPULATE", 0)
    if populate and hasattr(mmap, "MAP_SHARED"):
        return mmap.mmap(fileno, 0, flags=mmap.MAP_SHARED | populate, prot=mmap.PROT_READ)
    return mmap.mmap(fileno, 0, access=mmap.ACCESS_READ)
