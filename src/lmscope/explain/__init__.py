"""Automated interpretability: label features of an atlas and score how true each label is (docs/explain.md).

Example::

    from lmscope.explain import explain_atlas, score_atlas
    explain_atlas("atlas.db", "stats")                         # offline labels, scored on held-out examples
    explain_atlas("atlas.db", "anthropic", limit=50)           # Claude (ANTHROPIC_API_KEY)
    score_atlas("atlas.db", "detection", "openai", base_url="http://127.0.0.1:8080/v1")
"""

from lmscope.explain.backends import AnthropicBackend, Completion, LocalBackend, OpenAIBackend, make_backend
from lmscope.explain.labels import set_human_label, write_machine_label
from lmscope.explain.ops import BackendError, ExplainError, OpsConfig, Usage
from lmscope.explain.pipeline import RunReport, explain_atlas, score_atlas
from lmscope.explain.rules import Rule, parse, render
from lmscope.explain.scorers import Score, ScoreConfig, lm_score, rule_score
from lmscope.explain.stats_explainer import StatsLabel, explain_stats

__all__ = [
    "AnthropicBackend",
    "BackendError",
    "Completion",
    "ExplainError",
    "LocalBackend",
    "OpenAIBackend",
    "OpsConfig",
    "Rule",
    "RunReport",
    "Score",
    "ScoreConfig",
    "StatsLabel",
    "Usage",
    "explain_atlas",
    "explain_stats",
    "lm_score",
    "make_backend",
    "parse",
    "render",
    "rule_score",
    "score_atlas",
    "set_human_label",
    "write_machine_label",
]
