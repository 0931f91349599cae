"""Two models to compare: the checks that make a comparison meaningful, and the corpus contexts both read.

A diff compares a BASE model with OTHER (a fine-tune, an organism, a checkpoint). Token-level comparisons need
the same tokenizer; activation comparisons need the same width and depth too. `check_pair` refuses a pair that
fails what a part needs, naming the difference and the fix.
"""

from __future__ import annotations

from lmscope.corpora.contexts import Contexts, corpus_contexts
from lmscope.errors import DiffError
from lmscope.model.adapter import Model


def check_pair(base: Model, other: Model, widths: bool = True) -> None:
    """Refuse two models whose tokenizers differ (always) or whose widths/depths differ (when `widths`)."""
    tb, to = base.tokenizer, other.tokenizer
    if tb is None or to is None:
        raise DiffError("both models need a tokenizer to be compared on text")
    vb, vo = tb.get_vocab(), to.get_vocab()
    if vb != vo:
        only = sorted(set(vb).symmetric_difference(vo))[:5]
        raise DiffError(
            f"the two models have different tokenizers ({len(vb)} vs {len(vo)} tokens"
            + (f", e.g. {only} in one only" if only else ", same tokens with other ids")
            + "); a diff compares a model with a fine-tune of it: pass two models that share a tokenizer"
        )
    if widths and (base.d_model, base.n_layers) != (other.d_model, other.n_layers):
        raise DiffError(
            f"the two models differ in shape: {base.n_layers} layers x {base.d_model} vs {other.n_layers} layers x "
            f"{other.d_model}; activation diffs and crosscoders need the same architecture (a fine-tune of BASE)"
        )


__all__ = ["Contexts", "check_pair", "corpus_contexts"]
