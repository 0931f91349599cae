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

CONTEXT_KINDS = ("url", "docstring", "comment", "string", "number", "code", "prose")
CONTEXT_WORDS = {"url": "URLs", "docstring": "docstrings", "comment": "comments", "string": "strings",
                 "number": "numbers", "code": "code", "prose": "prose"}  # fmt: skip

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
    """Fires at a position whose token is in `tokens` (or of `token_class`), whose previous token is in `prev`
    (if given), inside a `context` kind (if given) and at position <= `max_pos` (if given)."""

    tokens: frozenset[str] = field(default_factory=frozenset)
    token_class: str | None = None
    prev: frozenset[str] = field(default_factory=frozenset)
    context: str | None = None
    max_pos: int | None = None

    def matches(self, tokens: list[str], i: int, ctx_kinds: list[str] | None = None, pos: int | None = None) -> bool:
        t = tokens[i]
        if self.tokens and t not in self.tokens:
            return False
        if self.token_class and not CLASSES[self.token_class][1](t):
            return False
        if not self.tokens and not self.token_class and not self.prev and not self.context and self.max_pos is None:
            return False
        if self.prev and (i == 0 or tokens[i - 1] not in self.prev):
            return False
        if self.context and (ctx_kinds is None or ctx_kinds[i] != self.context):
            return False
        return self.max_pos is None or (pos if pos is not None else i) <= self.max_pos

    def match_all(self, tokens: list[str], ctx_kinds: list[str] | None = None, start: int = 0) -> list[bool]:
        return [self.matches(tokens, i, ctx_kinds, start + i) for i in range(len(tokens))]


def _quote(t: str) -> str:
    return repr(t)


def _token_list(ts: frozenset[str], limit: int = 6) -> str:
    items = sorted(ts, key=lambda s: (s.strip().lower(), s))[:limit]
    return ", ".join(_quote(t) for t in items)


def render(rule: Rule, hedge: str = "") -> str:
    """The label text of a rule, e.g. "mostly the tokens ' court', ' law' in prose" or "digits after ' page'"."""
    if rule.token_class:
        what = CLASSES[rule.token_class][0]
    elif rule.tokens:
        what = ("the token " if len(rule.tokens) == 1 else "the tokens ") + _token_list(rule.tokens)
    else:
        what = "tokens"
    parts = [f"{hedge} {what}".strip()]
    if rule.prev:
        parts.append(f"after {_token_list(rule.prev)}")
    if rule.context:
        parts.append(f"in {CONTEXT_WORDS[rule.context]}")
    if rule.max_pos is not None:
        parts.append("near the start of the context")
    return " ".join(parts)


_LITERAL = re.compile(r"""'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*\"""")
_HEDGES = ("unclear, perhaps", "sometimes", "mostly", "often")


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


def parse(text: str) -> Rule | None:
    """The rule a label states, or None if it states none this module can run. Understands labels written by
    `render`, and plain ones such as "digits", "digits in code", "the token ' the' after ' of'"."""
    s = text.strip()
    # quoted token literals are swapped for placeholders first, so their contents never read as keywords
    lits: list[str] = []

    def hold(m: re.Match[str]) -> str:
        lits.append(m.group(0))
        return f"\x00{len(lits) - 1}\x00"

    skel = _LITERAL.sub(hold, s)
    low = skel.lower()
    for h in _HEDGES:
        if low.startswith(h + " ") or low.startswith(h + ":"):
            low = low[len(h) + 1 :].lstrip(" :")
            break
    max_pos = None
    if "near the start of the context" in low:
        max_pos = 3
        low = low.replace("near the start of the context", "").strip()
    context = None
    m = re.search(r"\b(?:in|inside|within) (urls?|docstrings?|comments?|strings?|numbers|code|prose)\s*$", low)
    if m:
        word = m.group(1).rstrip("s") if m.group(1) not in ("prose",) else "prose"
        context = {"url": "url", "docstring": "docstring", "comment": "comment", "string": "string",
                   "number": "number", "code": "code", "prose": "prose"}.get(word)  # fmt: skip
        low = low[: m.start()].strip()
    prev: frozenset[str] = frozenset()
    if " after " in f" {low} ":
        head, _, tail = f" {low} ".partition(" after ")
        prev = _literals(_restore(tail, lits))
        low = head.strip()
    tokens = _literals(_restore(low, lits))
    token_class = None
    if not tokens:
        for name, words in _CLASS_SYNONYMS.items():
            if any(re.search(rf"\b{re.escape(w)}\b", low) for w in words):
                token_class = name
                break
    rule = Rule(tokens, token_class, prev, context, max_pos)
    if not tokens and not token_class and not prev and not context and max_pos is None:
        return None
    return rule


def _restore(s: str, lits: list[str]) -> str:
    return re.sub(r"\x00(\d+)\x00", lambda m: lits[int(m.group(1))], s)


# ---------------------------------------------------------------------------------------------- context kinds
_URL = re.compile(r"(?:https?://|www\.)[^\s\"'<>)\]]+")
_CODE_LINE = re.compile(
    r"^\s*(def |class |import |from \S+ import|return\b|if .*:\s*$|for .*:\s*$|while .*:\s*$|elif |else:|try:|"
    r"except|print\(|@\w)|[=!<>]=|\w\(.*\)|[{};]\s*$|^\s{4,}\S|\bself\.|->|=>|\w+\s*=\s*\S"
)


def classify_context(tokens: list[str]) -> list[str]:
    """One context kind per token (see CONTEXT_KINDS), from lexical rules over the decoded text."""
    text = "".join(tokens)
    n = len(text)
    url = [False] * n
    for m in _URL.finditer(text):
        for k in range(m.start(), m.end()):
            url[k] = True
    # per line: is it code-like?
    line_of = [0] * n
    code_line = [bool(_CODE_LINE.search(ln)) for ln in text.split("\n")]
    cur = 0
    for k, ch in enumerate(text):
        line_of[k] = cur
        if ch == "\n":
            cur += 1
    # state machine: docstrings, comments, strings (on code lines)
    state = [""] * n
    triple: str | None = None
    quote: str | None = None
    comment = False
    k = 0
    while k < n:
        ch = text[k]
        if ch == "\n":
            comment = False
            quote = None
        if triple:
            state[k] = "docstring"
            if text.startswith(triple, k):
                for j in range(k, min(n, k + 3)):
                    state[j] = "docstring"
                k += 3
                triple = None
                continue
        elif text.startswith('"""', k) or text.startswith("'''", k):
            triple = text[k : k + 3]
            for j in range(k, min(n, k + 3)):
                state[j] = "docstring"
            k += 3
            continue
        elif comment:
            state[k] = "comment"
        elif quote:
            state[k] = "string"
            if ch == "\\":
                k += 2
                continue
            if ch == quote:
                quote = None
        elif ch == "#" and code_line[line_of[k]]:
            comment = True
            state[k] = "comment"
        elif ch in "\"'" and code_line[line_of[k]] and not (ch == "'" and k > 0 and text[k - 1].isalnum()):
            quote = ch
            state[k] = "string"
        k += 1
    out = []
    off = 0
    for t in tokens:
        span = range(off, off + len(t))
        off += len(t)
        chars = [j for j in span if not text[j].isspace()] or list(span)
        if not chars:
            out.append("code" if code_line[line_of[min(off, n - 1)]] else "prose")
            continue
        j = chars[0]
        if any(url[c] for c in chars):
            out.append("url")
        elif state[j] in ("docstring", "comment", "string"):
            out.append(state[j])
        elif _is_digit(t) or re.fullmatch(r"\s*\d[\d.,_]*", t):
            out.append("number")
        elif code_line[line_of[j]]:
            out.append("code")
        else:
            out.append("prose")
    return out
