"""Streaming corpus readers and tokenisation into fixed-length contexts.

Readers yield documents (strings) one at a time in a fixed, deterministic order, so a harvest can be
resumed by re-reading the corpus and skipping what is already on disk. Every reader has a
`fingerprint()` that changes when its configuration or its files change.

Specs accepted by `open_corpus` (and `lmscope harvest --corpus`):

- `stdlib`: the built-in corpus, Python's standard library source plus pydoc_data's English reference
  text (PSF License), interleaved in a fixed order. It exists on every machine with Python.
- a text file, a directory (read recursively) or a glob pattern (`docs/**/*.md`);
- `*.jsonl` / `*.ndjson` JSON Lines files (the `field` of each object is a document);
- `*.parquet` files (the `field` column, read with pyarrow in record batches);
- `hf:NAME[:CONFIG]`, a Hugging Face `datasets` dataset by hub name (from the local cache) or local path,
  when the optional `datasets` package is installed.
"""

from __future__ import annotations

import glob as globlib
import hashlib
import json
import os
import re
import sys
import sysconfig
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmscope.errors import LmscopeError


class CorpusError(LmscopeError):
    """A corpus could not be found, read or tokenised."""


@dataclass
class CorpusStats:
    """Counts collected while a corpus is read (reset by each `documents()` pass)."""

    documents: int = 0
    empty_documents: int = 0
    replaced_bytes: int = 0  # undecodable bytes replaced by U+FFFD
    files_with_replacements: int = 0
    skipped_binary_files: int = 0
    bytes_read: int = 0


_SURROGATES = re.compile("[\udc80-\udcff]")


def decode_bytes(data: bytes) -> tuple[str, int]:
    """Decode UTF-8, replacing each undecodable byte by U+FFFD; returns (text, number replaced)."""
    try:
        return data.decode("utf-8"), 0
    except UnicodeDecodeError:
        text = data.decode("utf-8", errors="surrogateescape")
        return _SURROGATES.subn("\ufffd", text)


def _sha(*parts: Any) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(json.dumps(p, sort_keys=True, default=str).encode())
        h.update(b"\0")
    return h.hexdigest()


def _file_identity(paths: Iterable[Path], root: Path | None = None) -> list[tuple[str, int, str]]:
    """(name, size, sha256 of the first and last 64 KiB) for each file: cheap, but catches real edits."""
    out = []
    for p in paths:
        size = p.stat().st_size
        with open(p, "rb") as fh:
            head = fh.read(65536)
            if size > 65536:
                fh.seek(max(65536, size - 65536))
                head += fh.read()
        name = p.relative_to(root).as_posix() if root else p.name
        out.append((name, size, hashlib.sha256(head).hexdigest()))
    return out


class Corpus:
    """Base class: a named, fingerprinted, re-iterable stream of documents."""

    kind = "corpus"

    def __init__(self) -> None:
        self.stats = CorpusStats()
        # With `record_names` set, `names[i]` is the source of the i-th document of the current pass ("" if
        # unknown): a file's path, a record's `source`/`path`/`url`/`title`/`id` field. Off by default (a long
        # harvest need not keep a name per document).
        self.record_names = False
        self.names: list[str] = []

    def documents(self) -> Iterator[str]:  # pragma: no cover - abstract
        raise NotImplementedError

    def __iter__(self) -> Iterator[str]:
        return self.documents()

    def fingerprint(self) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind}

    def _start(self) -> None:
        self.stats = CorpusStats()
        self.names = []

    def _emit(self, text: str, name: str = "") -> str | None:
        if not text:
            self.stats.empty_documents += 1
            return None
        self.stats.documents += 1
        if self.record_names:
            self.names.append(name)
        return text


NAME_FIELDS = ("source", "path", "file", "filename", "url", "title", "id")


def record_name(obj: Any, skip: str) -> str:
    """The source of a record: its first non-empty NAME_FIELDS field other than the document's own field."""
    for key in NAME_FIELDS:
        v = obj.get(key) if key != skip else None
        if isinstance(v, str | int) and not isinstance(v, bool) and str(v).strip():
            return str(v).strip()[:200]
    return ""


def expand_paths(spec: str | os.PathLike[str], suffixes: tuple[str, ...] = ()) -> tuple[list[Path], Path | None]:
    """Files named by a path, directory (recursive) or glob pattern, in sorted order, and their root."""
    s = os.path.expanduser(str(spec))
    if any(c in s for c in "*?["):
        files = sorted(Path(p) for p in globlib.glob(s, recursive=True) if Path(p).is_file())
        root = Path(s.split("*")[0].split("?")[0].split("[")[0] or ".")
        root = root if root.is_dir() else root.parent
        if not files:
            raise CorpusError(f"the glob pattern {s!r} matches no files; check the pattern (quote it in a shell)")
        return [f for f in files if not _hidden(f)], root
    p = Path(s)
    if p.is_file():
        return [p], None
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and not _hidden(f.relative_to(p)))
        if suffixes:
            files = [f for f in files if f.name.endswith(suffixes)]
        if not files:
            raise CorpusError(f"the directory {p} holds no {'/'.join(suffixes) or ''} files; it is an empty corpus")
        return files, p
    raise CorpusError(f"corpus not found: {s!r} is not a file, a directory, a glob pattern, 'stdlib' or 'hf:NAME'")


def _hidden(p: Path) -> bool:
    return any(part.startswith(".") or part == "__pycache__" for part in p.parts)


class TextCorpus(Corpus):
    """Text files (a file, a directory read recursively, or a glob): one document per file."""

    kind = "text"

    def __init__(self, spec: str | os.PathLike[str]) -> None:
        super().__init__()
        self.spec = str(spec)
        self.files, self.root = expand_paths(spec)

    def documents(self) -> Iterator[str]:
        self._start()
        for path in self.files:
            data = path.read_bytes()
            self.stats.bytes_read += len(data)
            if b"\0" in data[:8192]:
                self.stats.skipped_binary_files += 1
                continue
            text, bad = decode_bytes(data)
            if bad:
                self.stats.replaced_bytes += bad
                self.stats.files_with_replacements += 1
            name = path.relative_to(self.root).as_posix() if self.root else path.name
            if (doc := self._emit(text, name)) is not None:
                yield doc

    def fingerprint(self) -> str:
        return _sha(self.kind, _file_identity(self.files, self.root))

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "spec": self.spec, "files": len(self.files)}


class _FieldFilesCorpus(Corpus):
    """Files whose records each hold one document in the field (or column) `field`."""

    suffixes: tuple[str, ...] = ()

    def __init__(self, spec: str | os.PathLike[str], field: str = "text") -> None:
        super().__init__()
        self.spec, self.field = str(spec), field
        self.files, self.root = expand_paths(spec, self.suffixes)

    def fingerprint(self) -> str:
        return _sha(self.kind, self.field, _file_identity(self.files, self.root))

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "spec": self.spec, "field": self.field, "files": len(self.files)}


class JsonlCorpus(_FieldFilesCorpus):
    """JSON Lines files: the string `field` of each object is one document."""

    kind = "jsonl"
    suffixes = (".jsonl", ".ndjson")

    def documents(self) -> Iterator[str]:
        self._start()
        for path in self.files:
            with open(path, "rb") as fh:
                for lineno, raw in enumerate(fh, 1):
                    self.stats.bytes_read += len(raw)
                    line, bad = decode_bytes(raw)
                    self.stats.replaced_bytes += bad
                    if not line.strip():
                        continue
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise CorpusError(
                            f"{path}:{lineno} is not valid JSON ({exc.msg}); fix or remove that line"
                        ) from exc
                    if not isinstance(obj, dict) or self.field not in obj:
                        keys = ", ".join(obj) if isinstance(obj, dict) else type(obj).__name__
                        raise CorpusError(
                            f"{path}:{lineno} has no field {self.field!r} (it has: {keys}); pass --field NAME"
                        )
                    value = obj[self.field]
                    if value is None:
                        self.stats.empty_documents += 1
                        continue
                    if (doc := self._emit(str(value), record_name(obj, self.field))) is not None:
                        yield doc


class ParquetCorpus(_FieldFilesCorpus):
    """Parquet files: one document per row of the string column `field`, read in record batches."""

    kind = "parquet"
    suffixes = (".parquet",)

    def __init__(self, spec: str | os.PathLike[str], field: str = "text", batch_rows: int = 1024) -> None:
        super().__init__(spec, field)
        self.batch_rows = batch_rows

    def documents(self) -> Iterator[str]:
        try:
            import pyarrow.parquet as pq
        except ImportError as exc:  # pragma: no cover - pyarrow is a core dependency
            raise CorpusError("reading Parquet needs pyarrow: pip install pyarrow") from exc
        self._start()
        for path in self.files:
            try:
                pf = pq.ParquetFile(path)
            except Exception as exc:
                raise CorpusError(f"{path} is not a readable Parquet file ({exc})") from exc
            names = pf.schema_arrow.names
            if self.field not in names:
                raise CorpusError(
                    f"{path} has no column {self.field!r} (it has: {', '.join(names)}); pass --field NAME"
                )
            for batch in pf.iter_batches(batch_size=self.batch_rows, columns=[self.field]):
                for value in batch.column(0).to_pylist():
                    if value is None:
                        self.stats.empty_documents += 1
                        continue
                    if isinstance(value, bytes):
                        value, bad = decode_bytes(value)
                        self.stats.replaced_bytes += bad
                    if (doc := self._emit(str(value))) is not None:
                        yield doc


class HFDatasetCorpus(Corpus):
    """A Hugging Face `datasets` dataset (hub name from the local cache, or a local path), streamed."""

    kind = "hf"

    def __init__(self, name: str, config: str | None = None, split: str = "train", field: str = "text") -> None:
        super().__init__()
        self.name, self.config, self.split, self.field = name, config, split, field
        try:
            import datasets  # noqa: F401
        except ImportError as exc:
            raise CorpusError(
                "the hf: corpus needs the optional `datasets` package: pip install datasets "
                "(or export the data to JSONL/Parquet and pass that file)"
            ) from exc

    def _load(self) -> Any:
        import datasets

        try:
            if Path(self.name).is_dir() and (Path(self.name) / "dataset_info.json").exists():
                ds = datasets.load_from_disk(self.name)
                return ds[self.split] if hasattr(ds, "keys") and self.split in ds else ds
            return datasets.load_dataset(self.name, self.config, split=self.split, streaming=True)
        except Exception as exc:
            raise CorpusError(f"could not load dataset {self.name!r} (split {self.split!r}): {exc}") from exc

    def documents(self) -> Iterator[str]:
        self._start()
        for i, row in enumerate(self._load()):
            if self.field not in row:
                raise CorpusError(
                    f"dataset {self.name!r} row {i} has no field {self.field!r} (it has: {', '.join(row)}); "
                    "pass --field NAME"
                )
            value = row[self.field]
            if value is None:
                self.stats.empty_documents += 1
                continue
            if (doc := self._emit(str(value), record_name(row, self.field))) is not None:
                yield doc

    def fingerprint(self) -> str:
        ds = self._load()
        return _sha(self.kind, self.name, self.config, self.split, self.field, getattr(ds, "_fingerprint", None))

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "config": self.config, "split": self.split, "field": self.field}


_STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "__phello__"}


def _stdlib_sources(root: Path) -> Iterator[Path]:
    """The .py files under `root`, never descending into the skipped directories (site-packages is large)."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _STDLIB_SKIP_DIRS]
        yield from (Path(dirpath) / f for f in filenames if f.endswith(".py"))


class StdlibCorpus(Corpus):
    """The built-in corpus: Python's standard library source and pydoc_data's English reference text.

    Documents alternate between the reference topics (sorted by topic name) and the `.py` files of the
    standard library (sorted by relative path; test suites and site-packages left out), then the rest
    of whichever is longer. Python Software Foundation License (PSF License Agreement).
    """

    kind = "stdlib"
    license = "PSF-2.0 (Python Software Foundation License Agreement)"

    def __init__(self) -> None:
        super().__init__()
        self.root = Path(sysconfig.get_paths()["stdlib"])
        self.files = sorted(_stdlib_sources(self.root), key=lambda p: p.relative_to(self.root).as_posix())
        self.files = [p for p in self.files if p.relative_to(self.root).as_posix() != "pydoc_data/topics.py"]
        if not self.files:
            raise CorpusError(f"no standard library source found under {self.root}; is this Python installed fully?")

    @staticmethod
    def _topics() -> list[tuple[str, str]]:
        try:
            from pydoc_data.topics import topics
        except ImportError:  # some minimal Pythons strip pydoc_data
            return []
        return sorted(topics.items())

    def documents(self) -> Iterator[str]:
        self._start()
        topics = self._topics()
        for i in range(max(len(topics), len(self.files))):
            if i < len(topics) and (doc := self._emit(topics[i][1], f"pydoc topic {topics[i][0]}")) is not None:
                yield doc
            if i < len(self.files):
                data = self.files[i].read_bytes()
                self.stats.bytes_read += len(data)
                text, bad = decode_bytes(data)
                self.stats.replaced_bytes += bad
                self.stats.files_with_replacements += bool(bad)
                if (doc := self._emit(text, self.files[i].relative_to(self.root).as_posix())) is not None:
                    yield doc

    def fingerprint(self) -> str:
        names = [(p.relative_to(self.root).as_posix(), p.stat().st_size) for p in self.files]
        topics = hashlib.sha256("".join(t for _, t in self._topics()).encode()).hexdigest()
        return _sha(self.kind, sys.version_info[:3], names, topics)

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "python": ".".join(map(str, sys.version_info[:3])),
            "files": len(self.files),
            "topics": len(self._topics()),
            "license": self.license,
        }


def open_corpus(spec: str | Corpus, field: str = "text", split: str = "train") -> Corpus:
    """A corpus from a spec: 'stdlib', a text file/dir/glob, a .jsonl or .parquet file/dir/glob, or hf:NAME[:CONFIG]."""
    if isinstance(spec, Corpus):
        return spec
    s = str(spec)
    if s == "stdlib":
        return StdlibCorpus()
    if s.startswith("hf:"):
        name, _, config = s[3:].partition(":")
        if not name:
            raise CorpusError("hf: needs a dataset name or path, e.g. hf:wikitext:wikitext-2-raw-v1")
        return HFDatasetCorpus(name, config or None, split=split, field=field)
    lower = s.lower()
    if lower.endswith((".jsonl", ".ndjson")) or (Path(s).is_dir() and _only_suffix(Path(s), (".jsonl", ".ndjson"))):
        return JsonlCorpus(s, field=field)
    if lower.endswith(".parquet") or (Path(s).is_dir() and _only_suffix(Path(s), (".parquet",))):
        return ParquetCorpus(s, field=field)
    return TextCorpus(s)


def _only_suffix(d: Path, suffixes: tuple[str, ...]) -> bool:
    files = [f for f in d.rglob("*") if f.is_file() and not _hidden(f.relative_to(d))]
    return bool(files) and all(f.name.endswith(suffixes) for f in files)
