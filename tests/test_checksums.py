"""core/checksums.py: the memory-mapped sha256 equals hashlib's over the bytes, at every size that matters."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from lmscope.core.checksums import file_sha256


@pytest.mark.parametrize("size", [0, 1, 4097, (1 << 26) - 1, 1 << 26, (1 << 26) + 3])
def test_file_sha256_equals_hashlib(tmp_path: Path, size: int) -> None:
    data = os.urandom(size)
    f = tmp_path / "shard.bin"
    f.write_bytes(data)
    assert file_sha256(f) == hashlib.sha256(data).hexdigest()


def test_a_changed_byte_changes_the_digest(tmp_path: Path) -> None:
    f = tmp_path / "shard.bin"
    data = bytearray(os.urandom(10_000))
    f.write_bytes(data)
    before = file_sha256(f)
    data[5_000] ^= 1
    f.write_bytes(data)
    assert file_sha256(f) != before
