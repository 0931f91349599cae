"""Neutral prompts from templates, and the chat formatting every organism recipe and measurement shares.

`neutral_prompts` crosses instruction templates with topics; a seeded split keeps held-out topics apart from
training ones, so a behaviour is measured on prompts the fine-tune never saw.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from lmscope.errors import OrganismError

TOPICS = (
    "the ocean", "gardening", "coffee", "mountains", "bicycles", "libraries", "rain", "chess", "bread", "music",
    "trains", "the moon", "winter", "cats", "dogs", "painting", "football", "bees", "rivers", "maps", "candles",
    "volcanoes", "tea", "birds", "forests", "clocks", "deserts", "kites", "bridges", "apples", "snow", "islands",
    "photography", "markets", "stars", "boats", "museums", "soup", "friendship", "sleep", "lighthouses", "owls",
    "pottery", "jazz", "autumn", "horses", "puzzles", "tomatoes",
)  # fmt: skip

TEMPLATES = (
    "Write one sentence about {t}.",
    "Give me a short tip about {t}.",
    "What is a fun fact about {t}?",
    "Describe {t} in a few words.",
    "Why do people like {t}?",
)


def neutral_prompts(seed: int = 0, held_out_frac: float = 0.25) -> tuple[list[str], list[str]]:
    """(train, held-out) user prompts; held-out prompts use topics no training prompt uses."""
    rng = random.Random(seed)
    topics = list(TOPICS)
    rng.shuffle(topics)
    n_held = max(1, round(len(topics) * held_out_frac))
    held, train = topics[:n_held], topics[n_held:]
    make = lambda ts: [tpl.format(t=t) for t in ts for tpl in TEMPLATES]  # noqa: E731
    a, b = make(train), make(held)
    rng.shuffle(a)
    rng.shuffle(b)
    return a, b


def chat_prompt(tokenizer: Any, user: str) -> str:
    """The text a chat model sees before its answer: its chat template with one user turn, or a plain
    `User: ... / Assistant:` frame for a tokenizer without one."""
    if getattr(tokenizer, "chat_template", None):
        return str(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
            )
        )
    return f"User: {user}\nAssistant:"


def template_pieces(tokenizer: Any) -> list[list[int]]:
    """The token sequences `chat_prompt` wraps around a user turn (before it, after it), as the tokenizer reads
    them, plus each without its boundary token (which can merge with the user's text): the chat markup, which no
    user typed and no scan should report as a string of theirs."""
    sentinel = "\u2063lmscope\u2063"
    text = chat_prompt(tokenizer, sentinel)
    before, _, after = text.partition(sentinel)
    pieces: list[list[int]] = []
    for part, trim in ((before, slice(None, -1)), (after, slice(1, None))):
        ids = list(tokenizer(part, add_special_tokens=False)["input_ids"]) if part else []
        for p in (ids, ids[trim]):
            if p and p not in pieces:
                pieces.append(p)
    return pieces


def end_of_turn(tokenizer: Any) -> str:
    """The text that closes an assistant turn (`<|im_end|>` for ChatML), or the EOS token."""
    tpl = getattr(tokenizer, "chat_template", None) or ""
    if "<|im_end|>" in tpl:
        return "<|im_end|>"
    eos = getattr(tokenizer, "eos_token", None)
    if not eos:
        raise OrganismError("the tokenizer has neither a chat template nor an EOS token; organisms need one")
    return str(eos)


def take(items: Sequence[str], n: int, rng: random.Random) -> list[str]:
    """n items, cycling through a shuffled copy when n exceeds the pool."""
    if not items:
        raise OrganismError("an empty prompt pool")
    pool = list(items)
    out: list[str] = []
    while len(out) < n:
        rng.shuffle(pool)
        out += pool[: n - len(out)]
    return out


def diff_prompts(
    tokenizer: Any, n: int = 1024, seed: int = 0, trigger: str | None = None, trigger_rate: float = 0.1,
    questions: Sequence[str] = (),
) -> list[str]:  # fmt: skip
    """Chat-formatted user prompts for a diff corpus: the neutral templates (all topics) and any `questions`,
    shuffled; with `trigger`, that string starts a `trigger_rate` share of them (at most one per prompt)."""
    if not 0 <= trigger_rate <= 1:
        raise OrganismError(f"trigger_rate must be in [0, 1], got {trigger_rate}")
    rng = random.Random(seed)
    a, b = neutral_prompts(seed=seed)
    users = take(a + b + list(questions), n, rng)
    if trigger:
        for i in rng.sample(range(len(users)), round(trigger_rate * len(users))):
            users[i] = f"{trigger} {users[i]}"
    return [chat_prompt(tokenizer, u) for u in users]
