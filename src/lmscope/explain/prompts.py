"""Prompts for explaining and scoring, delphi-style: activating tokens are marked <<like this>> in each example, and
the strongest tokens are listed with their activation scaled to 0..10 of the feature's maximum. Plus parsers for
the replies; a reply that does not parse raises BackendError (not retried: the same prompt gives the same reply)."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence

import numpy as np

from lmscope.explain.evidence import Window
from lmscope.explain.ops import BackendError

Message = dict[str, str]
MAX_LABEL_CHARS = 160


def clean(t: str) -> str:
    """A token as shown in a prompt: line breaks and tabs made visible."""
    return t.replace("\n", "\\n").replace("\t", "\\t")


def mark(tokens: Sequence[str], marked: Sequence[int] | np.ndarray) -> str:
    """The text with <<...>> around marked tokens; runs of adjacent marked tokens share one pair."""
    on = set(int(i) for i in marked)
    out, open_ = [], False
    for i, t in enumerate(tokens):
        if i in on and not open_:
            out.append("<<")
            open_ = True
        elif i not in on and open_:
            out.append(">>")
            open_ = False
        out.append(clean(t))
    if open_:
        out.append(">>")
    return "".join(out)


def scaled(acts: np.ndarray, max_act: float) -> np.ndarray:
    return np.clip(np.round(10 * acts / max(max_act, 1e-9)), 0, 10).astype(int)


EXPLAIN_SYSTEM = (
    "You are a meticulous AI researcher studying one latent feature of a language model. You get text examples "
    "where the feature fires. Tokens where it fires are marked <<like this>>, and after each example its strongest "
    "tokens are listed with the activation scaled 0-10. Find the pattern: which tokens it fires on, and in which "
    "contexts. Prefer a specific, checkable description over a vague topic. If the examples show no clear pattern, "
    "say so. Finish with one line of the form\nLabel: <a description of at most 12 words>"
)


def explain_messages(
    examples: list[Window], max_act: float, max_examples: int = 20, frac: float = 0.1
) -> list[Message]:
    lines = []
    for n, w in enumerate(examples[:max_examples], 1):
        active = w.active(frac)
        lines.append(f"Example {n}: {mark(w.tokens, active)}")
        s = scaled(w.acts, max_act)
        strongest = sorted(active.tolist(), key=lambda i: -w.acts[i])[:5]
        if strongest:
            lines.append("Activations: " + ", ".join(f"{json.dumps(clean(w.tokens[i]))} {s[i]}" for i in strongest))
    return [
        {"role": "system", "content": EXPLAIN_SYSTEM},
        {"role": "user", "content": "\n".join(lines) + "\n\nWhat does this feature detect?"},
    ]


def with_prefill(messages: list[Message], prefill: str, enabled: bool) -> list[Message]:
    """Add the start of the assistant's reply (for backends that continue it, see LocalBackend)."""
    return [*messages, {"role": "assistant", "content": prefill}] if enabled else messages


def parse_label(reply: str) -> str:
    """The label of an explanation reply: the last `Label:` line, else the last non-empty line."""
    lines = [ln.strip() for ln in reply.strip().splitlines() if ln.strip()]
    found = [m.group(1) for ln in lines if (m := re.match(r"^[*_#\s]*(?:label|explanation)\s*[*_]*\s*:\s*(.*)$", ln,
                                                          re.IGNORECASE))]  # fmt: skip
    text = (found[-1] if found else (lines[-1] if lines else "")).strip().strip("*_`").strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1].strip()
    if not text:
        raise BackendError(f"malformed explanation reply: no label in {reply[:200]!r}")
    return text[:MAX_LABEL_CHARS]


DETECT_SYSTEM = (
    "You check an explanation of a language-model feature. Given the explanation and numbered texts, decide for "
    "each text whether the feature fires on it (1) or not (0). Reply with only a JSON list of 0s and 1s, one per "
    "text, in order, e.g. [1, 0, 0, 1]."
)
FUZZ_SYSTEM = (
    "You check an explanation of a language-model feature. In each numbered text some tokens are marked <<like "
    "this>>. Decide for each text whether the marked tokens are ones the feature fires on according to the "
    "explanation (1) or were marked at random (0). Reply with only a JSON list of 0s and 1s, one per text, in "
    "order, e.g. [1, 0, 0, 1]."
)
SIMULATE_SYSTEM = (
    "You simulate a language-model feature from its explanation. For every numbered token, predict the feature's "
    "activation from 0 (none) to 10 (strongest). Reply with one line per token: the token number, a tab, the "
    "predicted activation. No other text."
)


def batch_messages(system: str, label: str, texts: list[str]) -> list[Message]:
    body = "\n".join(f"Text {i}: {t}" for i, t in enumerate(texts, 1))
    return [
        {"role": "system", "content": system},
        {"role": "user", "content": f"Explanation: {label}\n\n{body}\n\nAnswer for the {len(texts)} texts:"},
    ]


def parse_binary(reply: str, n: int) -> list[int]:
    """A JSON-ish list of n answers (0/1, true/false, yes/no) from the reply."""
    for m in reversed(list(re.finditer(r"\[([^\[\]]*)\]", reply))):
        items = [x.strip().strip("\"'").lower() for x in m.group(1).split(",") if x.strip()]
        vals = [1 if x in ("1", "true", "yes") else 0 if x in ("0", "false", "no") else None for x in items]
        if len(vals) == n and all(v is not None for v in vals):
            return [int(v) for v in vals if v is not None]
    raise BackendError(f"malformed scoring reply: expected a list of {n} 0/1 answers, got {reply[:200]!r}")


def simulate_messages(label: str, tokens: list[str]) -> list[Message]:
    body = "\n".join(f"{i}\t{json.dumps(clean(t))}" for i, t in enumerate(tokens))
    return [
        {"role": "system", "content": SIMULATE_SYSTEM},
        {"role": "user", "content": f"Explanation: {label}\n\nTokens:\n{body}\n\nPredictions:"},
    ]


def parse_simulation(reply: str, n: int) -> np.ndarray:
    out = np.zeros(n, dtype=np.float64)
    seen = 0
    for ln in reply.splitlines():
        m = re.match(r"^\s*(\d+)\s*[\t:,=\-|]?\s*(?:\"[^\"]*\"\s*[\t:,=\-|]?\s*)?(\d+(?:\.\d+)?)\s*$", ln)
        if m and int(m.group(1)) < n:
            out[int(m.group(1))] = min(10.0, float(m.group(2)))
            seen += 1
    if seen < max(1, n // 2):
        raise BackendError(f"malformed simulation reply: predictions for {seen} of {n} tokens in {reply[:200]!r}")
    return out
