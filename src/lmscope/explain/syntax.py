"""What kind of text each token sits in, from the decoded text alone (no model): the context kind (url, docstring,
comment, string, number, code, prose; lexical rules) and a finer syntax class (for code, from Python's `tokenize`:
keyword, name, called name, attribute, defined name, operator; for prose: sentence start, inside quotes, inside
parentheses). `Annotated` carries both for a window, with the document it came from and the tokens around it, so a
label's conditions can be run on it (rules.py).
"""

from __future__ import annotations

import io
import keyword
import re
import tokenize
from dataclasses import dataclass, field

CONTEXT_KINDS = ("url", "docstring", "comment", "string", "number", "code", "prose")
CONTEXT_WORDS = {"url": "URLs", "docstring": "docstrings", "comment": "comments", "string": "strings",
                 "number": "numbers", "code": "code", "prose": "prose"}  # fmt: skip
# syntax classes, with the words a label uses for them (render and parse share these)
SYNTAX_WORDS = {
    "keyword": "used as keywords",
    "name": "used as names",
    "call": "naming a called function",
    "attribute": "used as attribute names",
    "definition": "naming what a def or class defines",
    "operator": "used as operators",
    "sentence_start": "at the start of a sentence",
    "quoted": "inside quotation marks",
    "parenthesised": "inside parentheses",
}
SYNTAX_CLASSES = tuple(SYNTAX_WORDS)

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
        elif t.strip().isdigit() or re.fullmatch(r"\s*\d[\d.,_]*", t):
            out.append("number")
        elif code_line[line_of[j]]:
            out.append("code")
        else:
            out.append("prose")
    return out


def _code_syntax(line: str) -> list[str]:
    """A syntax class per character of one code line ('' where none), from Python's tokenizer; a line it cannot
    finish (an unclosed bracket or string) keeps the classes of the tokens read before the error."""
    out = [""] * len(line)
    toks: list[tokenize.TokenInfo] = []
    try:
        for t in tokenize.generate_tokens(io.StringIO(line).readline):
            toks.append(t)
    except (tokenize.TokenError, IndentationError, SyntaxError):
        pass
    sig = [t for t in toks if t.type in (tokenize.NAME, tokenize.OP, tokenize.NUMBER, tokenize.STRING)]
    for k, t in enumerate(sig):
        if t.start[0] != 1:
            continue
        prev = sig[k - 1].string if k else ""
        nxt = sig[k + 1].string if k + 1 < len(sig) else ""
        if t.type == tokenize.NAME:
            if keyword.iskeyword(t.string):
                cls = "keyword"
            elif prev in ("def", "class"):
                cls = "definition"
            elif prev == ".":
                cls = "attribute"
            elif nxt == "(":
                cls = "call"
            else:
                cls = "name"
        elif t.type == tokenize.OP:
            cls = "operator"
        else:
            continue
        end = t.end[1] if t.end[0] == 1 else len(line)
        for c in range(t.start[1], min(end, len(line))):
            out[c] = cls
    return out


def _prose_syntax(line: str) -> list[str]:
    """Per character of one prose line: inside quotes, inside parentheses, or the first word of a sentence."""
    out = [""] * len(line)
    quote = False
    depth = 0
    sentence = True  # the first word of the line starts a sentence
    for c, ch in enumerate(line):
        if ch in "\"\u201c\u201d":
            quote = not quote if ch == '"' else ch == "\u201c"
            continue
        if ch == "(":
            depth += 1
            continue
        if ch == ")":
            depth = max(0, depth - 1)
            continue
        if quote:
            out[c] = "quoted"
        elif depth:
            out[c] = "parenthesised"
        elif ch.isalnum():
            if sentence:
                k = c
                while k < len(line) and line[k].isalnum():
                    out[k] = "sentence_start"
                    k += 1
                sentence = False
        elif ch in ".!?":
            sentence = True
    return out


def classify_syntax(tokens: list[str], kinds: list[str] | None = None) -> list[str]:
    """One syntax class per token (see SYNTAX_WORDS; '' where none applies): code classes on code lines outside
    strings, comments and docstrings, prose classes on prose lines; a token takes the class of its first
    non-space character."""
    kinds = kinds if kinds is not None else classify_context(tokens)
    text = "".join(tokens)
    char_kind = [""] * len(text)
    off = 0
    for t, k in zip(tokens, kinds, strict=True):
        for c in range(off, off + len(t)):
            char_kind[c] = k
        off += len(t)
    syn = [""] * len(text)
    start = 0
    for line in text.split("\n"):
        ks = {char_kind[start + c] for c in range(len(line)) if not line[c].isspace()}
        if ks & {"code", "number"}:
            cls = _code_syntax(line)
            for c, v in enumerate(cls):
                if char_kind[start + c] in ("code", "number"):
                    syn[start + c] = v
        elif ks == {"prose"}:
            for c, v in enumerate(_prose_syntax(line)):
                syn[start + c] = v
        start += len(line) + 1
    out = []
    off = 0
    for t in tokens:
        chars = [c for c in range(off, off + len(t)) if not text[c].isspace()]
        out.append(syn[chars[0]] if chars else "")
        off += len(t)
    return out


@dataclass
class Annotated:
    """A window's tokens with their context kind, syntax class and document (one each per token), plus up to a
    few tokens before (`left`) and after (`right`) the window in its context, for conditions that look there."""

    kinds: list[str]
    syntax: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    left: list[str] = field(default_factory=list)
    right: list[str] = field(default_factory=list)
    specials: frozenset[str] = frozenset()  # texts of special tokens (BOS ...): never proposed as context words

    def __post_init__(self) -> None:
        n = len(self.kinds)
        self.syntax = self.syntax or [""] * n
        self.sources = self.sources or [""] * n


def annotate(tokens: list[str]) -> Annotated:
    """Annotations from the window alone (no context around it, no document names)."""
    kinds = classify_context(tokens)
    return Annotated(kinds, classify_syntax(tokens, kinds))
