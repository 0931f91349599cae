"""Every token position of an atlas's stored contexts, annotated once: what the stats explainer and the offline
scorer look at around a token, as integer columns.

A window's token at context position p sees only its context: its previous and next token, the text just
before it, the words earlier on its line, the context kind, syntax class and document of p (`AtlasEvidence.kinds`
annotates a whole context; a window's `Annotated` is a slice of it, with up to `LINE_LOOKBACK` tokens before and one
after). So those values are a function of (context, p), not of the feature: computed here once for the atlas, a
feature's positions are looked up by index (`gather`) instead of rebuilt for every window of every feature.
Conditions keep `rules.check`'s exact semantics (tests/test_explain_pinned.py checks the labels are unchanged).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from lmscope.explain.rules import CLASSES, LINE_LOOKBACK, LOOKBACK
from lmscope.explain.syntax import CONTEXT_KINDS, SYNTAX_CLASSES

SYNTAX_NAMES = ("", *SYNTAX_CLASSES)


def after_texts(before: Callable[[int], list[str] | None], specials: frozenset[str]) -> list[str]:
    """The texts an `after` part could name at a position: its 2 and 3 tokens before, joined, where they exist,
    hold no special token, are not blank and break no line before their last character. `before(n)` gives the n
    token texts right before it (None if its context starts later)."""
    out = []
    for n in (2, 3):
        toks = before(n)
        if toks is not None:
            text = "".join(toks)
            if text.strip() and "\n" not in text[:-1] and n <= LOOKBACK and not any(x in specials for x in toks):
                out.append(text)
    return out


class Interner:
    """Distinct values and their codes (0 is None, for 'no token here')."""

    def __init__(self) -> None:
        self.values: list[Any] = [None]
        self.code: dict[Any, int] = {}
        self._decoder: np.ndarray | None = None

    def __call__(self, v: Any) -> int:
        c = self.code.get(v)
        if c is None:
            c = self.code[v] = len(self.values)
            self.values.append(v)
        return c

    def lut(self, pred: Callable[[Any], bool]) -> np.ndarray:
        """A boolean per code: pred(value) (False for None)."""
        return np.array([False] + [bool(pred(v)) for v in self.values[1:]], dtype=bool)

    def members(self, vals: Iterable[Any]) -> np.ndarray:
        """A boolean per code: the value is one of `vals`."""
        out = np.zeros(len(self.values), dtype=bool)
        for v in vals:
            c = self.code.get(v)
            if c is not None:
                out[c] = True
        return out

    def decoder(self) -> np.ndarray:
        """The values as an object array, indexed by code (cached until a value is added)."""
        arr = self._decoder
        if arr is None or len(arr) != len(self.values):
            arr = self._decoder = np.empty(len(self.values), dtype=object)
            arr[:] = self.values
        return arr


class PositionTable:
    """Columns over every position of the contexts given (in the order given), each context's positions
    contiguous. `texts[c]` are a context's token texts; `kinds`, `syntax`, `sources` one value per token."""

    COLUMNS = ("tokens", "prev", "next", "context", "syntax", "source")  # the code columns, rows of `stacked`

    def __init__(self, contexts: Iterable[tuple[int, list[str], list[str], list[str], list[str]]],
                 specials: frozenset[str]) -> None:  # fmt: skip
        self.texts = Interner()
        self.sources = Interner()
        self.kinds = Interner()
        self.syntax = Interner()
        for k in CONTEXT_KINDS:
            self.kinds(k)
        for k in SYNTAX_NAMES:
            self.syntax(k)
        self.specials = specials
        self.offset: dict[int, int] = {}
        tok: list[int] = []
        kind: list[int] = []
        syn: list[int] = []
        src: list[int] = []
        pos: list[int] = []
        ctx_end: list[int] = []
        for cid, texts, kinds, syntax, sources in contexts:
            self.offset[int(cid)] = len(tok)
            tok += [self.texts(t) for t in texts]
            kind += [self.kinds(k) for k in kinds]
            syn += [self.syntax(s) for s in syntax]
            src += [self.sources(s) for s in sources]
            pos += range(len(texts))
            ctx_end += [len(tok)] * len(texts)
        n = len(tok)
        self.tok = np.array(tok, dtype=np.int64)
        self.pos = np.array(pos, dtype=np.int64)
        self.kind = np.array(kind, dtype=np.int64)
        self.syn = np.array(syn, dtype=np.int64)
        self.src = np.array(src, dtype=np.int64)
        self.end = np.array(ctx_end, dtype=np.int64)  # one past each position's context
        first = self.pos == 0
        self.prev = np.zeros(n, dtype=np.int64)  # 0: none (position 0)
        self.prev[1:] = self.tok[:-1]
        self.prev[first] = 0
        self.next = np.zeros(n, dtype=np.int64)
        self.next[:-1] = self.tok[1:]
        self.next[self.end - 1 == np.arange(n)] = 0
        vals = self.texts.values
        self.text_newline = self.texts.lut(lambda t: "\n" in t)
        self.text_special = self.texts.lut(lambda t: t in specials)
        strip = Interner()
        self.strip_of_text = np.array([0] + [strip(t.strip()) for t in vals[1:]], dtype=np.int64)
        self.strip_codes = strip.code
        # the last position an `anchor` at position k reaches: up to LINE_LOOKBACK tokens on, not past the next
        # token that holds a line break, not past its context
        nl = np.flatnonzero(self.text_newline[self.tok])
        at = np.arange(n)
        nxt = np.searchsorted(nl, at, side="right")
        stop = np.where(nxt < len(nl), nl[np.minimum(nxt, len(nl) - 1)], n) if len(nl) else np.full(n, n)
        self.reach = np.minimum(np.minimum(at + LINE_LOOKBACK, stop), self.end - 1)
        self.stacked = np.stack([self.tok, self.prev, self.next, self.kind, self.syn, self.src])
        self._class_lut: dict[str, np.ndarray] = {}
        self._anchor: dict[tuple[str, bool], np.ndarray] = {}  # the positions that can anchor a word
        self._by_strip: tuple[np.ndarray, np.ndarray] | None = None
        self._words: dict[int, frozenset[str]] = {}
        self._after: dict[int, list[str]] = {}

    def __len__(self) -> int:
        return len(self.tok)

    def gather(self, context: int, start: int, n: int) -> np.ndarray:
        """Table indices of positions start .. start + n - 1 of a context."""
        if n <= 0:
            return np.zeros(0, dtype=np.int64)
        base = self.offset[int(context)] + int(start)
        return np.arange(base, base + n, dtype=np.int64)

    def gather_many(self, contexts: list[int], starts: list[int], lens: np.ndarray) -> np.ndarray:
        """`gather` for many windows, end to end."""
        if not len(lens):
            return np.zeros(0, dtype=np.int64)
        base = np.array([self.offset[int(c)] if n else 0 for c, n in zip(contexts, lens.tolist(), strict=True)],
                        dtype=np.int64) + np.asarray(starts, dtype=np.int64)  # fmt: skip
        first = np.cumsum(lens) - lens
        return np.arange(int(lens.sum()), dtype=np.int64) + np.repeat(base - first, lens)

    def class_lut(self, name: str) -> np.ndarray:
        got = self._class_lut.get(name)
        if got is None:
            got = self._class_lut[name] = self.texts.lut(CLASSES[name][1])
        return got

    def anchor(self, word: str, idx: np.ndarray, skip_special: bool = False) -> np.ndarray:
        """Per table position of `idx`: `word` is a token (whitespace stripped) earlier on the line within
        LINE_LOOKBACK tokens (rules.check's `anchor`). With `skip_special`, special tokens do not count (as
        `line_words`)."""
        key = (word, skip_special)
        ks = self._anchor.get(key)
        if ks is None:
            code = self.strip_codes.get(word)
            ks = np.zeros(0, dtype=np.int64)
            if code is not None:
                if self._by_strip is None:
                    codes = self.strip_of_text[self.tok]
                    order = np.argsort(codes, kind="stable")
                    cuts = np.searchsorted(codes[order], np.arange(len(self.strip_codes) + 2))
                    self._by_strip = (order, cuts)
                order, cuts = self._by_strip
                ks = order[cuts[code] : cuts[code + 1]]
                t = self.tok[ks]
                ok = ~self.text_newline[t]
                if skip_special:
                    ok &= ~self.text_special[t]
                ks = ks[ok]
            if len(self._anchor) > 65536:
                self._anchor.clear()
            self._anchor[key] = ks
        # a token at k anchors k+1 .. reach[k]; reach never decreases with k, so the nearest k before g decides
        i = np.searchsorted(ks, idx, side="left") - 1
        k = ks[np.maximum(i, 0)] if len(ks) else np.zeros(len(idx), dtype=np.int64)
        return (i >= 0) & (self.reach[k] >= idx) if len(ks) else np.zeros(len(idx), dtype=bool)

    def line_words(self, g: int) -> frozenset[str]:
        """The words (alphanumeric, over one character, no special token) earlier on position g's line within
        LINE_LOOKBACK tokens (the candidates for an `anchor` part), in the order the per-window scan adds them."""
        got = self._words.get(g)
        if got is None:
            vals = self.texts.values
            seen = set()
            lo = g - int(self.pos[g])
            for j in range(g - 1, max(lo - 1, g - 1 - LINE_LOOKBACK), -1):
                t = vals[self.tok[j]]
                if "\n" in t:
                    break
                w = t.strip()
                if len(w) > 1 and any(ch.isalnum() for ch in w) and t not in self.specials:
                    seen.add(w)
            got = self._words[g] = frozenset(seen)
        return got

    def after_texts(self, g: int) -> list[str]:
        """`after_texts` at position g (cached)."""
        got = self._after.get(g)
        if got is None:
            got = self._after[g] = after_texts(lambda n: self.before(g, n), self.specials)
        return got

    def before(self, g: int, n: int) -> list[str] | None:
        """The `n` token texts right before position g in its context, or None if the context starts later."""
        if int(self.pos[g]) < n:
            return None
        vals = self.texts.values
        return [vals[c] for c in self.tok[g - n : g].tolist()]

    def after_mask(self, idx: np.ndarray, v: str) -> np.ndarray:
        """Per position of `idx`: the text of the LOOKBACK tokens before it ends with `v` (rules.check's `after`)."""
        vals = self.texts.values
        prev = self.prev[idx]
        codes = np.unique(prev)
        ok = np.zeros(len(vals), dtype=bool)
        for c in codes.tolist():
            t = vals[c] if c else ""
            ok[c] = bool(c) and (t.endswith(v) or v.endswith(t))
        out = np.zeros(len(idx), dtype=bool)
        for i in np.flatnonzero(ok[prev]).tolist():
            g = int(idx[i])
            k = min(int(self.pos[g]), LOOKBACK)
            out[i] = "".join(vals[c] for c in self.tok[g - k : g].tolist()).endswith(v)
        return out
