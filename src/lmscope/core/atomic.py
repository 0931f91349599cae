"""Atomic file writes: a temp file in the same directory, fsync, then `os.replace`.

A reader (or a rerun after kill -9) sees either the old file or the complete new one, never a torn
write. On any error, including a full disk, the temp file is removed and the error propagates.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

TEMP_MARK = ".tmp-"


def temp_path_for(path: str | os.PathLike[str]) -> Path:
    """A unique, hidden temp path next to `path` (same directory, so `os.replace` is atomic)."""
    p = Path(path)
    return p.with_name(f".{p.name}{TEMP_MARK}{os.getpid()}-{secrets.token_hex(4)}")


def is_temp_path(path: str | os.PathLike[str]) -> bool:
    """True for names made by `temp_path_for` (leftovers of a killed writer may be deleted)."""
    name = Path(path).name
    return name.startswith(".") and TEMP_MARK in name


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Flush a directory entry (the rename) to disk; a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "wb", fsync: bool = True) -> Iterator[IO[Any]]:
    """Open a temp file for writing; on a clean exit it replaces `path` atomically."""
    if not any(c in mode for c in "wax") or "+" in mode or "r" in mode:
        raise ValueError(f"atomic_open is for writing only, got mode {mode!r}")
    target = Path(path)
    tmp = temp_path_for(target)
    try:
        with open(tmp, mode.replace("a", "w").replace("x", "w")) as fh:
            yield fh
            fh.flush()
            if fsync:
                os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    if fsync:
        fsync_dir(target.parent)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes | bytearray | memoryview, fsync: bool = True) -> None:
    with atomic_open(path, "wb", fsync=fsync) as fh:
        fh.write(data)


def atomic_write_text(path: str | os.PathLike[str], text: str, fsync: bool = True) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), fsync=fsync)


def atomic_write_json(path: str | os.PathLike[str], obj: Any, fsync: bool = True, indent: int | None = 2) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=False) + "\n", fsync=fsync)


def remove_stale_temps(directory: str | os.PathLike[str]) -> list[Path]:
    """Delete temp files left in `directory` by a killed writer; returns what was removed."""
    removed: list[Path] = []
    d = Path(directory)
    if not d.is_dir():
        return removed
    for p in d.iterdir():
        if p.is_file() and is_temp_path(p):
            with contextlib.suppress(OSError):
                p.unlink()
                removed.append(p)
    return removed
