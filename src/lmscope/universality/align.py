"""Token alignment across two tokenizers by characters, and the text chunks both models read.

Two models with different tokenizers cut the same text into different tokens. A causal model's activation at a
token depends on the text up to that token's last character, so two tokens that *end at the same character* have
read exactly the same text: those are paired, and only those. Everything else is dropped:

- a token that ends inside the other model's token (" un" + "believ" + "able" against " unbelievable": only
  "able" pairs with " unbelievable");
- the leading bytes of a character that a byte-level tokenizer splits over several tokens (each claims the whole
  character's span; the last one, which completes it, is kept);
- special tokens (BOS, padding), and tokens past either model's context length.

The end of each token comes from the tokenizer's offset mapping (fast tokenizers) or, for a slow tokenizer, from the
length of the decoded prefix (a token whose decoded prefix is not a prefix of the text gets no end and is dropped).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np


def char_ends(tokenizer: Any, text: str) -> tuple[list[int], list[int]]:
    """Token ids of `text` (no special tokens added) and where each token ends in it (a character offset; -1 when
    it cannot be told)."""
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(enc["input_ids"]), [int(e) for _s, e in enc["offset_mapping"]]
    except (NotImplementedError, ValueError, TypeError, KeyError):
        pass  # a slow (Python) tokenizer has no offset mapping: decode the prefixes instead
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    ends = []
    for i in range(len(ids)):
        prefix = tokenizer.decode(ids[: i + 1], clean_up_tokenization_spaces=False)
        ends.append(len(prefix) if text.startswith(prefix) else -1)
    return ids, ends


def align_ends(ends_a: list[int], ends_b: list[int]) -> tuple[list[int], list[int]]:
    """Index pairs (i in A, j in B), in text order, of tokens that end at the same character. Of several tokens
    with one end (a character split over bytes), the last is used; unknown ends (-1), ends at 0 and ends that go
    backwards are dropped."""

    def last_by_end(ends: list[int]) -> dict[int, int]:
        out: dict[int, int] = {}
        high = 0
        for i, e in enumerate(ends):
            if e <= 0 or e < high:
                continue
            out[e] = i
            high = e
        return out

    la, lb = last_by_end(ends_a), last_by_end(ends_b)
    common = sorted(set(la) & set(lb))
    return [la[e] for e in common], [lb[e] for e in common]


@dataclass
class AlignedBatch:
    """Contexts of the same text chunks for two tokenizers, right-padded: tokens_a [n, T], tokens_b [n, T] and the
    flat indices (row * T + position) of the paired tokens, pos_a[i] paired with pos_b[i]."""

    tokens_a: np.ndarray
    tokens_b: np.ndarray
    pos_a: np.ndarray
    pos_b: np.ndarray
    dropped_a: int  # text tokens of A (within its context) that found no partner
    dropped_b: int


class ChunkAligner:
    """Cuts documents into text chunks of about `context - 1` tokens of tokenizer A, tokenizes each chunk with both
    tokenizers (each with its own BOS first, when it has one, as lmscope's packing does), and pairs the tokens that
    end at the same character. B's tokens beyond `context` are cut (their text is then unpaired)."""

    def __init__(self, tok_a: Any, tok_b: Any, context: int, special_a: list[int], special_b: list[int]) -> None:
        self.tok_a, self.tok_b, self.context = tok_a, tok_b, int(context)
        self.special_a, self.special_b = set(special_a), set(special_b)

    def _row(self, tok: Any, text: str, special: set[int]) -> tuple[list[int], list[int], int]:
        ids, ends = char_ends(tok, text)
        lead = [tok.bos_token_id] if tok.bos_token_id is not None else []
        ids, ends = ids[: self.context - len(lead)], ends[: self.context - len(lead)]
        ends = [-1 if t in special else e for t, e in zip(ids, ends, strict=True)]  # a special token pairs with none
        return lead + ids, [-1] * len(lead) + ends, len(lead)

    def chunks(self, docs: Iterable[str]) -> Iterator[str]:
        """Text chunks of about context - 1 tokens of A each, in document order (a document's tail is a chunk)."""
        body = self.context - (1 if self.tok_a.bos_token_id is not None else 0)
        for doc in docs:
            if not doc:
                continue
            try:
                ends = [int(e) for _s, e in self.tok_a(doc, add_special_tokens=False,
                                                       return_offsets_mapping=True)["offset_mapping"]]
            except (NotImplementedError, ValueError, TypeError, KeyError):  # a slow tokenizer: ~3 characters a token
                ends = list(range(3, len(doc) + 3, 3))
                ends[-1] = len(doc)
            start = 0
            for k in range(body - 1, len(ends) + body - 1, body):
                end = ends[min(k, len(ends) - 1)]
                if end > start:
                    yield doc[start:end]
                    start = end

    def batches(self, docs: Iterable[str], batch_size: int) -> Iterator[AlignedBatch]:
        rows: list[tuple[list[int], list[int], list[int], list[int]]] = []
        for chunk in self.chunks(docs):
            ids_a, ends_a, _ = self._row(self.tok_a, chunk, self.special_a)
            ids_b, ends_b, _ = self._row(self.tok_b, chunk, self.special_b)
            ia, ib = align_ends(ends_a, ends_b)
            if not ia:
                continue
            rows.append((ids_a, ids_b, ia, ib))
            if len(rows) == batch_size:
                yield self._stack(rows)
                rows = []
        if rows:
            yield self._stack(rows)

    def _stack(self, rows: list[tuple[list[int], list[int], list[int], list[int]]]) -> AlignedBatch:
        T = self.context
        pad_a = _pad_id(self.tok_a)
        pad_b = _pad_id(self.tok_b)
        ta = np.full((len(rows), T), pad_a, dtype=np.int64)
        tb = np.full((len(rows), T), pad_b, dtype=np.int64)
        pa: list[int] = []
        pb: list[int] = []
        drop_a = drop_b = 0
        for r, (ids_a, ids_b, ia, ib) in enumerate(rows):
            ta[r, : len(ids_a)] = ids_a
            tb[r, : len(ids_b)] = ids_b
            pa += [r * T + i for i in ia]
            pb += [r * T + j for j in ib]
            drop_a += sum(t not in self.special_a for t in ids_a) - len(ia)
            drop_b += sum(t not in self.special_b for t in ids_b) - len(ib)
        return AlignedBatch(ta, tb, np.asarray(pa, dtype=np.int64), np.asarray(pb, dtype=np.int64), drop_a, drop_b)


def _pad_id(tok: Any) -> int:
    for v in (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id):
        if isinstance(v, int):
            return v
    return 0
