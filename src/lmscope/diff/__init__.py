"""Model diffing: what a fine-tune changed, checked against organisms whose change we planted ourselves.

`run_diff(base, other, out, DiffConfig, facts=..., control=...)` writes one report: weight, behaviour and
activation diffs, a BatchTopK crosscoder (optionally an L1 one) with relative decoder norms, Latent Scaling and
dossiers for the OTHER-only latents, and, for a facts file, the removed / suppressed verdict. `run_series` follows
checkpoints. `search` finds a string in a report's evidence. See docs/diff.md.
"""

from lmscope.diff.crosscoder import CrosscoderConfig, relative_norms
from lmscope.diff.knowledge import KnowledgeConfig
from lmscope.diff.pair import check_pair, corpus_contexts
from lmscope.diff.report import DiffConfig, run_diff, search
from lmscope.diff.scaling import latent_scaling
from lmscope.diff.series import run_series

__all__ = [
    "CrosscoderConfig",
    "DiffConfig",
    "KnowledgeConfig",
    "check_pair",
    "corpus_contexts",
    "latent_scaling",
    "relative_norms",
    "run_diff",
    "run_series",
    "search",
]
