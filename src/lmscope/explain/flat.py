"""The positions a stats label is fitted and counted on, with every condition's mask computed once.

`_Flat` lays the windows of a feature's explain half end to end. Each column (token, previous and next token,
context kind, syntax class, document, position) is an integer code per position; a condition of a rule
(`Rule.conditions`) becomes a mask, kept as a Python integer with one bit per position, so a rule is the AND of
its conditions' bits and its counts are popcounts:
- token level: tp = |rule & firing|, fp = |rule & quiet| (within the positions of a fold);
- window level: whether the rule fires anywhere in each window, for all windows at once by one carry: adding the
  bits of each window's positions but its last to the rule's bits there carries into the window's last bit
  exactly when one of them is set.
Masks have `rules.check`'s semantics (tests/test_explain_context.py and tests/test_explain_pinned.py compare
every kind of condition with it). The columns come from the windows' `Seq`s, or, labelling a whole atlas, from
its `PositionTable` by index (`table=`, `idx=`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np

from lmscope.explain.positions import Interner, PositionTable, after_texts
from lmscope.explain.rules import CLASSES, LINE_LOOKBACK, Rule, Seq, check, render


def _bits(m: np.ndarray) -> int:
    """A boolean array as an integer, bit i for element i."""
    return int.from_bytes(np.packbits(m, bitorder="little").tobytes(), "little")


class _Gathered(dict[str, np.ndarray]):
    """The code columns of a position table at `idx`, gathered together on first use."""

    def __init__(self, idx: np.ndarray, table: PositionTable) -> None:
        super().__init__()
        self.idx, self.table = idx, table

    def __missing__(self, key: str) -> np.ndarray:
        rows = self.table.stacked[:, self.idx]
        self.update(zip(self.table.COLUMNS, rows, strict=True))
        return self[key]


@dataclass
class _View:
    """A selection of positions (a fold), as bits, for counting."""

    y1: int  # firing positions in the selection
    y0: int  # quiet positions in the selection
    n1: int
    wpos: int  # the last position of each example window in the selection
    wneg: int  # the last position of each negative window in the selection
    npos: int
    nneg: int


class _Flat:
    """Every position of the explain half in one flat array (windows end to end), with each condition's mask
    computed once. Built from the windows' `Seq`s, or (`table`, `idx`) from an atlas's position table."""

    def __init__(self, seqs: list[Seq], ys: list[np.ndarray] | tuple[np.ndarray, np.ndarray],
                 window_labels: list[int] | None = None, table: PositionTable | None = None,
                 idx: np.ndarray | None = None) -> None:  # fmt: skip
        """`ys`: each window's token labels (1 firing, 0 quiet, -1 ignored), or (all of them end to end, each
        window's length)."""
        self.seqs = seqs
        self.table = table
        if isinstance(ys, tuple):
            self.y, self.wlen = ys
        else:
            self.wlen = np.array([len(y) for y in ys], dtype=np.int64)
            self.y = np.concatenate(ys) if ys else np.zeros(0, np.int64)
        self.wlab = np.array(window_labels if window_labels is not None else [1] * len(self.wlen), dtype=np.int64)
        self.wstart = (np.cumsum(self.wlen) - self.wlen).astype(np.int64)
        self.win = np.repeat(np.arange(len(self.wlen), dtype=np.int64), self.wlen)
        n = self.n = len(self.y)
        self.codes: dict[str, np.ndarray]
        if table is not None:
            assert idx is not None and len(idx) == n
            self.idx = idx
            self.texts, self.kinds, self.syntaxes, self.sources = table.texts, table.kinds, table.syntax, table.sources
            self.codes = _Gathered(idx, table)
            self.pos = table.pos[idx]
        else:
            self._from_seqs(seqs, self.wlen.tolist())
        self.decoders = {"tokens": self.texts, "prev": self.texts, "next": self.texts, "context": self.kinds,
                         "syntax": self.syntaxes, "source": self.sources}  # fmt: skip
        self.last = self.wstart + self.wlen - 1
        self._cache: dict[tuple[str, Any], int] = {}
        self._values: dict[tuple[str, Any], int] = {}
        self._words: dict[int, frozenset[str]] = {}
        self._rules: dict[Rule, int] = {}
        self._hits: dict[Rule, int] = {}
        self._text: dict[Rule, str] = {}

    @functools.cached_property
    def E(self) -> int:
        """The last position of each (non-empty) window."""
        return _bits(self._at(self.last[self.wlen > 0]))

    @functools.cached_property
    def L(self) -> int:
        """Every position but the last of its window."""
        return ((1 << self.n) - 1) ^ self.E

    @functools.cached_property
    def _labels(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        return self.y == 1, self.y == 0, self.wlab == 1, self.wlab == 0

    def _from_seqs(self, seqs: list[Seq], lens: list[int]) -> None:
        self.at = [(k, i) for k, n in enumerate(lens) for i in range(n)]
        self.texts, self.kinds, self.syntaxes, self.sources = Interner(), Interner(), Interner(), Interner()
        tx = self.texts
        tok, prev, nxt, kind, syn, src, pos = [], [], [], [], [], [], []
        for s, n in zip(seqs, lens, strict=True):
            for i in range(n):
                j = s.off + i
                tok.append(tx(s.full[j]))
                prev.append(tx(s.full[j - 1]) if j > 0 else 0)
                nxt.append(tx(s.full[j + 1]) if j + 1 < len(s.full) else 0)
                kind.append(self.kinds(s.ann.kinds[i]))
                syn.append(self.syntaxes(s.ann.syntax[i]))
                src.append(self.sources(s.ann.sources[i]))
                pos.append(s.start + i)
        arr = lambda v: np.array(v, dtype=np.int64)  # noqa: E731
        self.codes = {"tokens": arr(tok), "prev": arr(prev), "next": arr(nxt), "context": arr(kind),
                      "syntax": arr(syn), "source": arr(src)}  # fmt: skip
        self.pos = arr(pos)

    def _at(self, where: np.ndarray) -> np.ndarray:
        m = np.zeros(self.n, dtype=bool)
        m[where] = True
        return m

    # --------------------------------------------------------------------------------- what the search reads
    def vals(self, col: str, where: np.ndarray) -> list[Any]:
        """The values of a column at positions `where`, in order (None: no token there)."""
        out: list[Any] = self.decoders[col].decoder()[self.codes[col][where]].tolist()
        return out

    def before(self, i: int, n: int) -> list[str] | None:
        """The `n` token texts right before position i, or None if its context starts later."""
        if self.table is not None:
            return self.table.before(int(self.idx[i]), n)
        k, t = self.at[i]
        seq = self.seqs[k]
        j = seq.off + t
        return seq.full[j - n : j] if j - n >= 0 else None

    def after_texts(self, i: int) -> list[str]:
        """The texts an `after` part could name at position i (positions.after_texts)."""
        if self.table is not None:
            return self.table.after_texts(int(self.idx[i]))
        return after_texts(lambda n: self.before(i, n), self.seqs[self.at[i][0]].ann.specials)

    def line_words(self, i: int) -> frozenset[str]:
        """The words (alphanumeric, over one character, no special token) earlier on position i's line, within
        LINE_LOOKBACK tokens: the candidates for an `anchor` part (cached)."""
        if self.table is not None:
            return self.table.line_words(int(self.idx[i]))
        got = self._words.get(i)
        if got is None:
            k, t = self.at[i]
            seq = self.seqs[k]
            seen = set()
            for j in range(seq.off + t - 1, max(-1, seq.off + t - 1 - LINE_LOOKBACK), -1):
                if "\n" in seq.full[j]:
                    break
                w = seq.full[j].strip()
                if len(w) > 1 and any(ch.isalnum() for ch in w) and seq.full[j] not in seq.ann.specials:
                    seen.add(w)
            got = self._words[i] = frozenset(seen)
        return got

    def on_line(self, word: str, where: np.ndarray) -> int:
        """How many of the positions `where` have `word` among their line_words."""
        if self.table is not None:
            return int(np.count_nonzero(self.table.anchor(word, self.idx[where], skip_special=True)))
        return sum(word in self.line_words(i) for i in where.tolist())

    def render(self, rule: Rule) -> str:
        got = self._text.get(rule)
        if got is None:
            got = self._text[rule] = render(rule)
        return got

    # --------------------------------------------------------------------------------- masks
    def _mask(self, cond: tuple[str, Any]) -> np.ndarray:
        kind, v = cond
        codes = self.codes
        if kind in ("tokens", "prev", "next", "source"):
            return self.decoders[kind].members(v)[codes[kind]]
        if kind in ("context", "syntax"):
            return codes[kind] == self.decoders[kind].code.get(v, -1)
        if kind == "class":
            fn = CLASSES[v][1]
            lut = self.table.class_lut(v) if self.table is not None else self.texts.lut(fn)
            return lut[codes["tokens"]]
        if kind == "max_pos":
            return self.pos <= v
        if self.table is not None:
            if kind == "anchor":
                return self.table.anchor(v, self.idx)
            if kind == "after":
                return self.table.after_mask(self.idx, v)
            raise ValueError(f"unknown condition {kind!r}")
        return np.array([check(cond, self.seqs[k], i) for k, i in self.at], dtype=bool)

    def mask_bits(self, cond: tuple[str, Any]) -> int:
        got = self._cache.get(cond)
        if got is None:
            kind, v = cond
            if kind in ("tokens", "prev", "next", "source"):  # a set: the union of its values' positions
                got = 0
                for x in v:
                    got |= self._value_bits(kind, x)
            else:
                got = _bits(self._mask(cond))
            self._cache[cond] = got
        return got

    def _value_bits(self, col: str, x: Any) -> int:
        key = (col, x)
        got = self._values.get(key)
        if got is None:
            c = self.decoders[col].code.get(x)
            got = self._values[key] = 0 if c is None else _bits(self.codes[col] == c)
        return got

    def mask(self, cond: tuple[str, Any]) -> np.ndarray:
        return self._unbits(self.mask_bits(cond))

    def _unbits(self, b: int) -> np.ndarray:
        raw = np.frombuffer(b.to_bytes((self.n + 7) // 8, "little"), dtype=np.uint8)
        return np.unpackbits(raw, bitorder="little", count=self.n).astype(bool)

    def rule_bits(self, rule: Rule) -> int:
        got = self._rules.get(rule)
        if got is None:
            conds = rule.conditions()
            got = 0
            if conds:
                got = (1 << self.n) - 1
                for c in conds:
                    got &= self.mask_bits(c)
            self._rules[rule] = got
        return got

    def rule_mask(self, rule: Rule) -> np.ndarray:
        """Whether the rule fires at each position."""
        return self._unbits(self.rule_bits(rule))

    def hit_bits(self, rule: Rule) -> int:
        """The last position of each window the rule fires in, anywhere (cached)."""
        got = self._hits.get(rule)
        if got is None:
            m = self.rule_bits(rule)
            got = self._hits[rule] = (((m & self.L) + self.L) | m) & self.E
        return got

    # --------------------------------------------------------------------------------- counting
    def view(self, sel: np.ndarray) -> _View:
        wsel = np.zeros(len(self.wlab), dtype=bool)
        wsel[self.win[sel]] = True
        is1, is0, wis1, wis0 = self._labels
        y1, y0 = sel & is1, sel & is0
        wpos, wneg = wsel & wis1, wsel & wis0
        npos, nneg = int(np.count_nonzero(wpos)), int(np.count_nonzero(wneg))
        return _View(_bits(y1), _bits(y0), int(np.count_nonzero(y1)), _bits(self._at(self.last[wpos])),
                     _bits(self._at(self.last[wneg])), npos, nneg)  # fmt: skip

    def counts(self, rule: Rule, sel: np.ndarray | _View) -> tuple[int, int, int]:
        v = sel if isinstance(sel, _View) else self.view(sel)
        m = self.rule_bits(rule)
        tp = (m & v.y1).bit_count()
        return tp, (m & v.y0).bit_count(), v.n1 - tp

    def all_counts(self, rule: Rule, sel: np.ndarray | _View) -> tuple[int, int, int, int, int, int, int]:
        """counts + window_counts in one call."""
        v = sel if isinstance(sel, _View) else self.view(sel)
        m = self.rule_bits(rule)
        tp = (m & v.y1).bit_count()
        h = self._hits.get(rule)
        if h is None:
            h = self._hits[rule] = (((m & self.L) + self.L) | m) & self.E
        return tp, (m & v.y0).bit_count(), v.n1 - tp, (h & v.wpos).bit_count(), v.npos, (h & v.wneg).bit_count(), v.nneg

    def window_counts(self, rule: Rule, sel: np.ndarray | _View) -> tuple[int, int, int, int]:
        """(examples hit, examples, negatives hit, negatives) over the windows of `sel`: does the rule fire
        anywhere in a window, as a detection reader would say."""
        v = sel if isinstance(sel, _View) else self.view(sel)
        h = self.hit_bits(rule)
        return (h & v.wpos).bit_count(), v.npos, (h & v.wneg).bit_count(), v.nneg
