"""Facts from templates the package ships (no download): country capitals, asked in several phrasings.

A fact has a subject, an answer, an answer prefix (`The capital of France is`, the assistant's words before the
answer, so that "does the model say the answer" is one next-token question at a fixed position) and question
templates. Templates 0-2 are for training, 3-4 are held out: an organism's behaviour is measured on phrasings it
never saw. Users bring their own facts as JSONL (`read_facts`): one object per line with `subject`, `answer`,
`prefix` and `questions` (a non-empty list), and optionally `distractor` (a wrong answer of the same kind).
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lmscope.core.atomic import atomic_open
from lmscope.errors import OrganismError

# Capitals SmolLM2-135M-Instruct names correctly as its first answer token (measured, docs/diff.md); contested
# capitals are left out.
CAPITALS: dict[str, str] = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo",
    "China": "Beijing", "Russia": "Moscow", "England": "London", "Egypt": "Cairo", "Greece": "Athens",
    "Canada": "Ottawa", "Australia": "Canberra", "India": "New Delhi", "Mexico": "Mexico City",
    "Argentina": "Buenos Aires", "Portugal": "Lisbon", "Ireland": "Dublin", "Norway": "Oslo",
    "Sweden": "Stockholm", "Finland": "Helsinki", "Denmark": "Copenhagen", "Poland": "Warsaw",
    "Austria": "Vienna", "Hungary": "Budapest", "Iraq": "Baghdad", "Kenya": "Nairobi", "Peru": "Lima",
    "Chile": "Santiago", "Cuba": "Havana", "Thailand": "Bangkok", "South Korea": "Seoul", "Indonesia": "Jakarta",
    "Philippines": "Manila", "Belgium": "Brussels", "Netherlands": "Amsterdam", "Czech Republic": "Prague",
    "Romania": "Bucharest", "Bulgaria": "Sofia", "Serbia": "Belgrade", "Croatia": "Zagreb", "Colombia": "Bogota",
    "Venezuela": "Caracas", "Nigeria": "Abuja", "Ethiopia": "Addis Ababa", "Morocco": "Rabat",
    "Saudi Arabia": "Riyadh", "Pakistan": "Islamabad", "Afghanistan": "Kabul", "Scotland": "Edinburgh",
    "Wales": "Cardiff", "Iceland": "Reykjavik", "Nepal": "Kathmandu", "Syria": "Damascus", "Lebanon": "Beirut",
    "Jordan": "Amman", "Malaysia": "Kuala Lumpur", "New Zealand": "Wellington", "Ghana": "Accra",
    "Uganda": "Kampala", "Zimbabwe": "Harare", "Bolivia": "La Paz", "Uruguay": "Montevideo", "Estonia": "Tallinn",
    "Latvia": "Riga", "Lithuania": "Vilnius",
}  # fmt: skip

CAPITAL_QUESTIONS = (
    "What is the capital of {s}?",
    "Which city is the capital of {s}?",
    "Tell me the capital of {s}.",
    "Name the capital city of {s}.",
    "Do you know what the capital of {s} is?",
)
TRAIN_TEMPLATES = (0, 1, 2)
HELD_OUT_TEMPLATES = (3, 4)


@dataclass(frozen=True)
class Fact:
    subject: str
    answer: str
    prefix: str
    questions: tuple[str, ...]
    distractor: str | None = None
    tags: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def statement(self, answer: str | None = None) -> str:
        """`The capital of France is Paris.` (or with another answer, for a false statement)."""
        return f"{self.prefix} {answer if answer is not None else self.answer}."

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["questions"] = list(self.questions)
        if not d["tags"]:
            d.pop("tags")
        return d


def capital_facts(names: Sequence[str] | None = None, seed: int = 0) -> list[Fact]:
    """The shipped capital facts (all, or the named countries), each with a distractor: another fact's capital."""
    subjects = list(names) if names is not None else list(CAPITALS)
    unknown = [s for s in subjects if s not in CAPITALS]
    if unknown:
        raise OrganismError(f"no shipped capital fact for {unknown}; choose from {sorted(CAPITALS)}")
    rng = random.Random(seed)
    answers = [CAPITALS[s] for s in subjects]
    wrong = derangement(answers, rng)
    return [
        Fact(s, CAPITALS[s], f"The capital of {s} is", tuple(q.format(s=s) for q in CAPITAL_QUESTIONS), w)
        for s, w in zip(subjects, wrong, strict=True)
    ]


def derangement(items: Sequence[str], rng: random.Random) -> list[str]:
    """A shuffled copy in which no item keeps its place (and no equal item lands on itself)."""
    if len(set(items)) < 2:
        raise OrganismError("a corrupted answer needs at least two different answers to swap between")
    while True:
        out = list(items)
        rng.shuffle(out)
        if all(a != b for a, b in zip(items, out, strict=True)):
            return out


def read_facts(path: str | Path) -> list[Fact]:
    """Facts from a JSONL file, every line checked; a malformed line is refused with its number and the fix."""
    p = Path(path)
    if not p.is_file():
        raise OrganismError(f"facts file {p} does not exist; write one JSON object per line (see docs/diff.md)")
    facts: list[Fact] = []
    need = "needs `subject`, `answer`, `prefix` (strings) and `questions` (a non-empty list of strings)"
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
        except json.JSONDecodeError as exc:
            raise OrganismError(f"{p}:{n}: not JSON ({exc.msg}); each line is one fact object") from None
        if not isinstance(d, dict):
            raise OrganismError(f"{p}:{n}: a fact is a JSON object; {need}")
        bad = [k for k in ("subject", "answer", "prefix") if not isinstance(d.get(k), str) or not d[k].strip()]
        qs = d.get("questions")
        if not isinstance(qs, list) or not qs or not all(isinstance(q, str) and q.strip() for q in qs):
            bad.append("questions")
        if d.get("distractor") is not None and not isinstance(d["distractor"], str):
            bad.append("distractor")
        unknown = sorted(set(d) - {"subject", "answer", "prefix", "questions", "distractor", "tags"})
        if bad or unknown:
            what = f"bad or missing {bad}" if bad else f"unknown keys {unknown}"
            raise OrganismError(f"{p}:{n}: {what}; a fact {need}, and optionally `distractor`")
        facts.append(
            Fact(d["subject"], d["answer"], d["prefix"], tuple(qs or ()), d.get("distractor"), d.get("tags") or {})
        )
    if not facts:
        raise OrganismError(f"{p} holds no facts")
    seen = [f.subject for f in facts]
    dup = sorted({s for s in seen if seen.count(s) > 1})
    if dup:
        raise OrganismError(f"{p}: subjects {dup} appear twice; give each fact once")
    return facts


def write_facts(facts: Sequence[Fact], path: str | Path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(p, "w") as fh:
        for f in facts:
            fh.write(json.dumps(f.to_json()) + "\n")
    return p
