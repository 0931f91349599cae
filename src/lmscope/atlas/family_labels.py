"""Labels of feature families, from their members: the tokens and label words most members share, with the share.

Each live feature contributes a set of *terms*: the peak tokens of its top examples (stripped and lower-cased, so
" The" and "the" are one term; a whitespace-only token is shown as ↵, ␣ or →) and the words of its shown label
(the human label, else the best-scored machine label), less a few function words. A family's label names the terms
that at least `min_share` of its members have, and that are at least `min_lift` times as common in the family as
among all live features (so a token every feature peaks on, or a word every label template repeats, names
nothing), most shared first: "7 of 9 members: ‘digits’". When no term qualifies the label says "mixed", with the
most shared term and its share, so it never claims more than the members show.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

MAX_TERMS = 3  # terms named in a label
KEPT_TERMS = 5  # terms stored per family (the best ones, shared or not)
WORD = re.compile(r"[^\W_]{2,}")
_STOP_WORDS = (
    "a an and are as at be but by for from has have in into is it its of on or than that the this to was were with "
    "token tokens word words mostly sometimes often unclear perhaps"
)  # function words, and the hedges and nouns of lmscope's rule-label template
STOP = frozenset(_STOP_WORDS.split())


def token_term(text: str) -> str:
    """A token as a term: stripped and lower-cased; a whitespace-only token with its whitespace made visible."""
    t = text.strip().lower()
    return t if t else text.replace("\n", "↵").replace(" ", "␣").replace("\t", "→")


def member_terms(tokens: Iterable[str], label: str | None) -> dict[str, str]:
    """A feature's terms (term -> where it comes from: token, word or "token, word") from its peak tokens' texts and
    its shown label."""
    out = {token_term(t): "token" for t in tokens if t}
    for w in WORD.findall((label or "").lower()):
        if w not in STOP:
            out[w] = "token, word" if out.get(w) in ("token", "token, word") else "word"
    return out


def base_rates(terms: Mapping[int, Mapping[str, str]]) -> dict[str, float]:
    """The share of features that have each term."""
    n = max(1, len(terms))
    counts = Counter(t for ts in terms.values() for t in ts)
    return {t: c / n for t, c in counts.items()}


def _show(term: str) -> str:
    return f"‘{term}’"


def label_family(
    members: Sequence[int],
    terms: Mapping[int, Mapping[str, str]],
    base: Mapping[str, float],
    shown: Mapping[int, str],
    min_share: float = 0.5,
    min_lift: float = 2.0,
) -> tuple[str, list[dict[str, Any]]]:
    """(label, terms) of a family: the label in words, and its best `KEPT_TERMS` terms, each
    {"term", "kind", "count", "share", "base", "shared"} ("shared": it qualifies, see the module's docstring)."""
    size = len(members)
    counts: Counter[str] = Counter(t for m in members for t in terms.get(m, {}))
    kinds: dict[str, set[str]] = {}
    for m in members:
        for t, k in terms.get(m, {}).items():
            kinds.setdefault(t, set()).update(k.split(", "))

    def lift(t: str) -> float:
        return (counts[t] / size) / max(base.get(t, 0.0), 1e-12)

    ranked = sorted(counts, key=lambda t: (-counts[t], -lift(t), t))

    def ok(t: str) -> bool:
        share = counts[t] / size
        return size > 1 and counts[t] >= 2 and share >= min_share and share >= min_lift * base.get(t, 0.0)

    shared = [t for t in ranked if ok(t)]
    kept = (shared + [t for t in ranked if not ok(t)])[:KEPT_TERMS]
    rows = [{"term": t, "kind": ", ".join(sorted(kinds[t])), "count": counts[t], "share": round(counts[t] / size, 4),
             "base": round(base.get(t, 0.0), 4), "shared": ok(t)} for t in kept]  # fmt: skip
    if size == 1:
        m = members[0]
        return f"one member: #{m}" + (f" {shown[m]}" if shown.get(m) else ""), rows
    if shared:
        first, *rest = shared[:MAX_TERMS]
        text = f"{counts[first]} of {size} members: {_show(first)}"
        text += "".join(f"; {counts[t]} of {size}: {_show(t)}" for t in rest)
        return text, rows
    if not ranked:
        return f"mixed: the {size} members share no token or label word", rows
    best = ranked[0]
    if counts[best] / size >= min_share:  # shared widely, but about as widely among all features
        return (f"mixed: {counts[best]} of {size} members have {_show(best)}, but so do {base.get(best, 0.0):.0%} of "
                "all features"), rows  # fmt: skip
    most = f"most: {_show(best)}, {counts[best]} of them"
    return f"mixed: no term shared by {min_share:.0%} of the {size} members ({most})", rows
