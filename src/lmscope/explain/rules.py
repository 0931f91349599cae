"""Labels that can be run: a `Rule` says on which tokens a feature fires (token texts or a token class, optionally
after given tokens, inside a kind of context, near the start). The `stats` explainer writes rules as labels with
`render`, and the offline scorer reads any label back with `parse` and runs it over held-out windows.

Context kinds come from simple lexical rules over the decoded context (`classify_context`): url, docstring,
comment, string (quotes on a code-like line), number, code (a code-like line) and prose.
"""

from __future__ import annotations

import ast
import re
import string
from dataclasses import dataclass, field
from typing import Any

from lmscope.explain.syntax import (
    CONTEXT_KINDS,
    CONTEXT_WORDS,
    SYNTAX_WORDS,
    Annotated,
    classify_context,
)

__all__ = ["CLASSES", "CONTEXT_KINDS", "Rule", "Seq", "check", "classify_context", "parse", "render", "token_classes"]

# token classes: name -> (label wording, predicate on the token text)
_PUNCT = set(string.punctuation)


def _is_digit(t: str) -> bool:
    s = t.strip()
    return bool(s) and s.isdigit()


def _is_punct(t: str) -> bool:
    s = t.strip()
    return bool(s) and all(c in _PUNCT for c in s)


def _is_newline(t: str) -> bool:
    return "\n" in t and not t.strip()


def _is_space(t: str) -> bool:
    return bool(t) and not t.strip() and "\n" not in t


def _is_cap(t: str) -> bool:
    s = t.strip()
    return len(s) > 0 and s[0].isupper() and s.isalpha()


def _is_word_start(t: str) -> bool:
    return t.startswith(" ") and t[1:].isalpha()


def _is_word_piece(t: str) -> bool:
    return t.isalpha() and not t.startswith(" ")


def _is_upper(t: str) -> bool:
    s = t.strip()
    return len(s) > 1 and s.isalpha() and s.isupper()


CLASSES = {
    "digit": ("digits", _is_digit),
    "punct": ("punctuation", _is_punct),
    "newline": ("line breaks", _is_newline),
    "space": ("whitespace", _is_space),
    "upper": ("all-caps words", _is_upper),
    "cap": ("capitalized words", _is_cap),
    "word_start": ("word-initial tokens", _is_word_start),
    "word_piece": ("word continuations (subword pieces)", _is_word_piece),
}
# words a human (or another explainer) might use for a class, for `parse`
_CLASS_SYNONYMS = {
    "digit": ("digits", "digit", "numbers", "numerals", "number tokens"),
    "punct": ("punctuation", "punctuation marks"),
    "newline": ("line breaks", "newlines", "newline"),
    "space": ("whitespace", "spaces", "indentation"),
    "upper": ("all-caps words", "uppercase words", "acronyms"),
    "cap": ("capitalized words", "capitalised words", "proper nouns", "names"),
    "word_start": ("word-initial tokens", "word starts"),
    "word_piece": ("word continuations (subword pieces)", "word continuations", "subword pieces", "word pieces"),
}


def token_classes(t: str) -> list[str]:
    return [name for name, (_w, fn) in CLASSES.items() if fn(t)]


@dataclass(frozen=True)
class Rule:
    """Fires at a position whose token is in `tokens` (or of `token_class`) and that meets every other condition
    given: the previous token in `prev`; the text right before it ending with `after`; `anchor` earlier on the same
    line; the next token in `next`; a `context` kind; a `syntax` class; a document in `source`; a context position
    <= `max_pos`. A rule with no condition fires nowhere."""

    tokens: frozenset[str] = field(default_factory=frozenset)
    token_class: str | None = None
    prev: frozenset[str] = field(default_factory=frozenset)
    context: str | None = None
    max_pos: int | None = None
    syntax: str | None = None
    after: str | None = None
    anchor: str | None = None
    next: frozenset[str] = field(default_factory=frozenset)
    source: frozenset[str] = field(default_factory=frozenset)

    def __hash__(self) -> int:  # the dataclass's hash of the fields, computed once (rules are dict keys in searches)
        h: int | None = self.__dict__.get("_hash")
        if h is None:
            h = hash((self.tokens, self.token_class, self.prev, self.context, self.max_pos, self.syntax, self.after,
                      self.anchor, self.next, self.source))  # fmt: skip
            object.__setattr__(self, "_hash", h)
        return h

    def conditions(self) -> list[tuple[str, Any]]:
        """The rule as independent conditions (hashable), each checked by `check`."""
        out: list[tuple[str, Any]] = []
        if self.tokens:
            out.append(("tokens", self.tokens))
        if self.token_class:
            out.append(("class", self.token_class))
        if self.prev:
            out.append(("prev", self.prev))
        if self.after:
            out.append(("after", self.after))
        if self.anchor:
            out.append(("anchor", self.anchor))
        if self.next:
            out.append(("next", self.next))
        if self.context:
            out.append(("context", self.context))
        if self.syntax:
            out.append(("syntax", self.syntax))
        if self.source:
            out.append(("source", self.source))
        if self.max_pos is not None:
            out.append(("max_pos", self.max_pos))
        return out

    def extras(self) -> int:
        """How many conditions beyond the token set or class (computed once)."""
        n: int | None = self.__dict__.get("_extras")
        if n is None:
            n = len(self.conditions()) - bool(self.tokens) - bool(self.token_class)
            object.__setattr__(self, "_extras", n)
        return n

    def match_all(self, tokens: list[str], ann: Annotated | list[str] | None = None, start: int = 0) -> list[bool]:
        """Whether the rule fires at each token of a window; `ann` annotates it (a plain list: context kinds
        only), `start` is the window's first position in its context."""
        seq = Seq.of(tokens, ann, start)
        conds = self.conditions()
        if not conds:
            return [False] * len(tokens)
        return [all(check(c, seq, i) for c in conds) for i in range(len(tokens))]


_FIELDS = frozenset(Rule.__dataclass_fields__)


def extend(base: Rule, part: dict[str, Any]) -> Rule:
    """`dataclasses.replace(base, **part)` without the frozen dataclass's `__init__` (a rule search builds many)."""
    if not _FIELDS.issuperset(part):
        raise TypeError(f"Rule has no field(s) {sorted(set(part) - _FIELDS)}")
    d = {k: v for k, v in base.__dict__.items() if k in _FIELDS}  # not the cached hash
    d.update(part)
    r = object.__new__(Rule)
    object.__setattr__(r, "__dict__", d)
    return r


@dataclass
class Seq:
    """A window ready for `check`: its tokens with the annotated ones around it."""

    full: list[str]  # left + window + right
    off: int  # index of the window's first token in `full`
    ann: Annotated
    start: int

    @staticmethod
    def of(tokens: list[str], ann: Annotated | list[str] | None, start: int = 0) -> Seq:
        if ann is None:
            ann = Annotated(classify_context(tokens))
        elif not isinstance(ann, Annotated):
            ann = Annotated(list(ann))
        return Seq(list(ann.left) + list(tokens), len(ann.left), ann, start) if not ann.right else Seq(
            list(ann.left) + list(tokens) + list(ann.right), len(ann.left), ann, start)


LOOKBACK = 4  # tokens joined for an `after` condition
LINE_LOOKBACK = 24  # tokens searched back for an `anchor` on the same line


def check(cond: tuple[str, Any], seq: Seq, i: int) -> bool:
    """Whether condition `cond` (from Rule.conditions) holds at token `i` of the window."""
    kind, v = cond
    j = seq.off + i
    t = seq.full[j]
    if kind == "tokens":
        return t in v
    if kind == "class":
        return CLASSES[v][1](t)
    if kind == "prev":
        return j > 0 and seq.full[j - 1] in v
    if kind == "after":
        return "".join(seq.full[max(0, j - LOOKBACK) : j]).endswith(v)
    if kind == "anchor":
        for k in range(j - 1, max(-1, j - 1 - LINE_LOOKBACK), -1):
            if "\n" in seq.full[k]:
                return False
            if seq.full[k].strip() == v:
                return True
        return False
    if kind == "next":
        return j + 1 < len(seq.full) and seq.full[j + 1] in v
    if kind == "context":
        return seq.ann.kinds[i] == v
    if kind == "syntax":
        return seq.ann.syntax[i] == v
    if kind == "source":
        return seq.ann.sources[i] in v
    if kind == "max_pos":
        return seq.start + i <= v
    raise ValueError(f"unknown condition {kind!r}")


def _quote(t: str) -> str:
    return repr(t)


def _token_list(ts: frozenset[str]) -> str:
    """Every member, quoted, in a stable order (a label lists all of a rule's tokens, so it reads back exactly)."""
    items = sorted(ts, key=lambda s: (s.strip().lower(), s))
    return ", ".join(_quote(t) for t in items)


def render(rule: Rule, hedge: str = "") -> str:
    """The label text of a rule, e.g. "mostly the tokens ' court', ' law' in prose", "digits after ' page'",
    "the token 'INF' right after 'Decimal('' in the document '_pydecimal.py'". `parse` reads it back."""
    if rule.token_class:
        what = CLASSES[rule.token_class][0]
    elif rule.tokens:
        what = ("the token " if len(rule.tokens) == 1 else "the tokens ") + _token_list(rule.tokens)
    else:
        what = "tokens"
    parts = [f"{hedge} {what}".strip()]
    if rule.syntax:
        parts.append(SYNTAX_WORDS[rule.syntax])
    if rule.prev:
        parts.append(f"after {_token_list(rule.prev)}")
    if rule.after:
        parts.append(f"right after {_quote(rule.after)}")
    if rule.anchor:
        parts.append(f"later on a line with {_quote(rule.anchor)}")
    if rule.next:
        parts.append(f"before {_token_list(rule.next)}")
    if rule.context:
        parts.append(f"in {CONTEXT_WORDS[rule.context]}")
    if rule.source:
        parts.append(("in the document " if len(rule.source) == 1 else "in the documents ")
                     + _token_list(rule.source))  # fmt: skip
    if rule.max_pos is not None:
        parts.append("near the start of the context")
    return " ".join(parts)


_LITERAL = re.compile(r"""'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*\"""")
_HEDGES = ("unclear, perhaps", "sometimes", "mostly", "often")
_LITS = r"((?:\x00\d+\x00(?:,\s*)?)+)"  # one or more held literals


def _literals(s: str) -> frozenset[str]:
    out = set()
    for m in _LITERAL.finditer(s):
        try:
            v = ast.literal_eval(m.group(0))
        except (ValueError, SyntaxError):
            continue
        if isinstance(v, str) and v:
            out.add(v)
    return frozenset(out)


def _take(low: str, pattern: str) -> tuple[str, re.Match[str] | None]:
    """Remove the trailing clause `pattern` (anchored at the end) from `low`; returns the rest and the match."""
    m = re.search(pattern + r"\s*$", low)
    return (low[: m.start()].strip(), m) if m else (low, None)


def parse(text: str) -> Rule | None:
    """The rule a label states, or None if it states none this module can run. Understands labels written by
    `render`, and plain ones such as "digits", "digits in code", "the token ' the' after ' of'"."""
    s = text.strip()
    # quoted token literals are swapped for placeholders first, so their contents never read as keywords
    lits: list[str] = []

    def hold(m: re.Match[str]) -> str:
        lits.append(m.group(0))
        return f"\x00{len(lits) - 1}\x00"

    def one(m: re.Match[str] | None) -> str | None:
        got = sorted(_literals(_restore(m.group(1), lits))) if m else []
        return got[0] if got else None

    def many(m: re.Match[str] | None) -> frozenset[str]:
        return _literals(_restore(m.group(1), lits)) if m else frozenset()

    skel = _LITERAL.sub(hold, s)
    low = skel.lower()
    for h in _HEDGES:
        if low.startswith(h + " ") or low.startswith(h + ":"):
            low = low[len(h) + 1 :].lstrip(" :")
            break
    low, m = _take(low, r"\bnear the start of the context")
    max_pos = 3 if m else None
    low, m = _take(low, r"\bin the documents? " + _LITS)
    source = many(m)
    context = None
    low, m = _take(low, r"\b(?:in|inside|within) (urls?|docstrings?|comments?|strings?|numbers|code|prose)")
    if m:
        word = m.group(1).rstrip("s") if m.group(1) not in ("prose",) else "prose"
        context = {"url": "url", "docstring": "docstring", "comment": "comment", "string": "string",
                   "number": "number", "code": "code", "prose": "prose"}.get(word)  # fmt: skip
    low, m = _take(low, r"\bbefore " + _LITS)
    nxt = many(m)
    low, m = _take(low, r"\blater on a line with " + _LITS)
    anchor = one(m)
    low, m = _take(low, r"\bright after " + _LITS)
    after = one(m)
    prev: frozenset[str] = frozenset()
    if " after " in f" {low} ":
        head, _, tail = f" {low} ".partition(" after ")
        prev = _literals(_restore(tail, lits))
        low = head.strip()
    syntax = None
    for name, words in SYNTAX_WORDS.items():
        low2, m = _take(low, r"\b" + re.escape(words))
        if m:
            syntax, low = name, low2
            break
    tokens = _literals(_restore(low, lits))
    token_class = None
    if not tokens:
        for cname, synonyms in _CLASS_SYNONYMS.items():
            if any(re.search(rf"\b{re.escape(w)}\b", low) for w in synonyms):
                token_class = cname
                break
    rule = Rule(tokens, token_class, prev, context, max_pos, syntax, after, anchor, nxt, source)
    return rule if rule.conditions() else None


def _restore(s: str, lits: list[str]) -> str:
    return re.sub(r"\x00(\d+)\x00", lambda m: lits[int(m.group(1))], s)
