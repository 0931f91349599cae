"""Universality: match the features of two dictionaries (seeds, widths, layers, models) against a shuffled baseline.

`match_dictionaries(A, B)` scores every pair of features by decoder cosine (one residual width) and/or activation
correlation on a shared corpus (any two models; tokens aligned by characters when the tokenizers differ), matches
them one-to-one (Hungarian) or many-to-one (feature splitting across widths), and reports the fraction of features
with a partner above a threshold beside the same figure for a shuffled baseline. See docs/universality.md.
"""

from lmscope.universality.align import align_ends, char_ends
from lmscope.universality.match import match_dictionaries
from lmscope.universality.report import load_report, partners, side_of, write_report
from lmscope.universality.scores import MatchConfig, Matching, match_blocks, summarize

__all__ = [
    "MatchConfig",
    "Matching",
    "align_ends",
    "char_ends",
    "load_report",
    "match_blocks",
    "match_dictionaries",
    "partners",
    "side_of",
    "summarize",
    "write_report",
]
