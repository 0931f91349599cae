"""Tokenisation of documents into fixed-length contexts: packing (default) or per-document truncation."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

import numpy as np

from lmscope.corpora.readers import CorpusError


@dataclass(frozen=True)
class PackingConfig:
    """How documents become fixed-length contexts of token ids.

    mode: "pack" concatenates documents, each followed by `separator`, and cuts contexts of exactly
      `context` tokens (the final partial context is dropped); "truncate" makes one context per
      document, cut to `context` tokens and padded with the pad token (pad rows are marked special).
    bos: "context" puts the BOS token first in every context (the usual way models were trained and what
      SAE tooling expects), "document" puts it before every document, "none" never adds it.
    separator: token id put after each document when packing; None picks EOS (else BOS); -1 for none.

    To change one setting of an existing config use `dataclasses.replace(cfg, context=256)`; to read one back
    from JSON, `PackingConfig.from_dict`. Never rebuild it field by field (a field added later gets dropped).
    """

    context: int = 128
    mode: Literal["pack", "truncate"] = "pack"
    bos: Literal["context", "document", "none"] = "context"
    separator: int | None = None
    tokenize_batch: int = 64  # documents per tokenizer call, at most ...
    tokenize_chars: int = 65_536  # ... and about this many characters (so a small harvest tokenizes little extra)

    def __post_init__(self) -> None:
        if self.context < 2:
            raise CorpusError(f"context must be at least 2 tokens, got {self.context}")
        if self.mode not in ("pack", "truncate"):
            raise CorpusError(f"packing mode must be 'pack' or 'truncate', got {self.mode!r}")
        if self.bos not in ("context", "document", "none"):
            raise CorpusError(f"bos must be 'context', 'document' or 'none', got {self.bos!r}")

    def to_dict(self, *, batching: bool = False) -> dict[str, Any]:
        """The settings as plain JSON values. By default only those that decide the token ids (what a harvest
        manifest records and a resume compares); `batching=True` adds the tokenizer batching sizes too, so
        `PackingConfig.from_dict(p.to_dict(batching=True)) == p`."""
        d = asdict(self)
        if not batching:
            for name in _BATCHING:  # batching only: never changes the token ids
                d.pop(name)
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PackingConfig:
        """A config from `to_dict`'s output (either form); a missing setting takes its default, an unknown one
        is refused (a misspelt key would otherwise silently change nothing)."""
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise CorpusError(f"unknown packing setting(s) {', '.join(map(repr, unknown))}; known: {', '.join(known)}")
        return cls(**data)


_BATCHING = ("tokenize_batch", "tokenize_chars")


@dataclass
class ContextBatch:
    """`n` contexts: token ids, source document index, position in that document (-1 for tokens lmscope
    inserted: BOS, separators, padding), and whether each token is special (excluded from training)."""

    tokens: np.ndarray  # int64 [n, context]
    document: np.ndarray  # int64 [n, context]
    position: np.ndarray  # int32 [n, context]
    special: np.ndarray  # bool [n, context]

    def __len__(self) -> int:
        return int(self.tokens.shape[0])


@dataclass
class _Buf:
    tok: list[np.ndarray] = field(default_factory=list)
    doc: list[np.ndarray] = field(default_factory=list)
    pos: list[np.ndarray] = field(default_factory=list)
    n: int = 0

    def add(self, tok: np.ndarray, doc: np.ndarray, pos: np.ndarray) -> None:
        self.tok.append(tok)
        self.doc.append(doc)
        self.pos.append(pos)
        self.n += len(tok)

    def take_all(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        t, d, p = np.concatenate(self.tok), np.concatenate(self.doc), np.concatenate(self.pos)
        self.tok, self.doc, self.pos, self.n = [], [], [], 0
        return t, d, p


def special_token_ids(tokenizer: Any) -> list[int]:
    """Ids of BOS/EOS/pad and every other special token of a tokenizer."""
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id"):
        v = getattr(tokenizer, attr, None)
        if isinstance(v, int):
            ids.add(v)
    return sorted(ids)


class ContextPacker:
    """Turns documents into `ContextBatch`es of fixed length, deterministically."""

    def __init__(self, tokenizer: Any, config: PackingConfig | None = None) -> None:
        if tokenizer is None:
            raise CorpusError("tokenising a corpus needs a tokenizer; this model has none")
        self.tok = tokenizer
        self.cfg = config or PackingConfig()
        self.bos_id = tokenizer.bos_token_id
        if self.cfg.bos != "none" and self.bos_id is None:
            raise CorpusError(f"bos={self.cfg.bos!r} but the tokenizer has no BOS token; use bos='none' (--bos none)")
        sep = self.cfg.separator
        if sep is None:
            sep = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else self.bos_id
        self.sep_id: int | None = None if sep is None or sep < 0 else int(sep)
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else (self.sep_id if self.sep_id is not None else 0))
        self.special_ids = special_token_ids(tokenizer)
        self._special_lookup = np.array(self.special_ids, dtype=np.int64)
        self.tokens_read = 0

    def _encode(self, docs: list[str]) -> list[list[int]]:
        return self.tok(docs, add_special_tokens=False)["input_ids"]

    def _documents(self, docs: Iterable[str]) -> Iterator[tuple[int, list[int]]]:
        batch: list[str] = []
        chars = 0
        index = 0
        for d in docs:
            batch.append(d)
            chars += len(d)
            if len(batch) >= self.cfg.tokenize_batch or chars >= self.cfg.tokenize_chars:
                for ids in self._encode(batch):
                    yield index, ids
                    index += 1
                batch, chars = [], 0
        if batch:
            for ids in self._encode(batch):
                yield index, ids
                index += 1

    def _is_special(self, tokens: np.ndarray, pos: np.ndarray) -> np.ndarray:
        return (pos < 0) | np.isin(tokens, self._special_lookup)

    def contexts(self, docs: Iterable[str], batch_size: int = 32) -> Iterator[ContextBatch]:
        """Yield ContextBatches of up to `batch_size` contexts (the last may be smaller)."""
        rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        for row in self.rows(docs):
            rows.append(row)
            if len(rows) == batch_size:
                yield self.stack(rows)
                rows = []
        if rows:
            yield self.stack(rows)

    def stack(self, rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> ContextBatch:
        tok = np.stack([r[0] for r in rows])
        doc = np.stack([r[1] for r in rows])
        pos = np.stack([r[2] for r in rows]).astype(np.int32)
        return ContextBatch(tok, doc, pos, self._is_special(tok, pos))

    def rows(self, docs: Iterable[str]) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        c = self.cfg.context
        lead = 1 if self.cfg.bos == "context" else 0
        body = c - lead
        buf = _Buf()
        for index, ids in self._documents(docs):
            if not ids:
                continue
            self.tokens_read += len(ids)
            tok = np.asarray(ids, dtype=np.int64)
            pos = np.arange(len(tok), dtype=np.int64)
            if self.cfg.bos == "document":
                tok, pos = np.concatenate([[self.bos_id], tok]), np.concatenate([[-1], pos])
            if self.cfg.mode == "truncate":
                tok, pos = tok[:body], pos[:body]
                pad = body - len(tok)
                if pad:
                    tok = np.concatenate([tok, np.full(pad, self.pad_id, dtype=np.int64)])
                    pos = np.concatenate([pos, np.full(pad, -1, dtype=np.int64)])
                yield self._lead(tok, np.full(body, index, dtype=np.int64), pos, lead)
                continue
            if self.sep_id is not None:
                tok, pos = np.concatenate([tok, [self.sep_id]]), np.concatenate([pos, [-1]])
            buf.add(tok, np.full(len(tok), index, dtype=np.int64), pos)
            if buf.n >= body:
                t, d, p = buf.take_all()
                n_full = len(t) // body
                for k in range(n_full):
                    s = slice(k * body, (k + 1) * body)
                    yield self._lead(t[s], d[s], p[s], lead)
                rest = slice(n_full * body, None)
                if len(t[rest]):
                    buf.add(t[rest], d[rest], p[rest])

    def _lead(
        self, tok: np.ndarray, doc: np.ndarray, pos: np.ndarray, lead: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if not lead:
            return tok, doc, pos
        return (
            np.concatenate([[self.bos_id], tok]),
            np.concatenate([doc[:1], doc]),
            np.concatenate([[-1], pos]),
        )
