"""Removed or suppressed, end to end on SmolLM2 organisms made inside the test (marker `slow`: about 35-45 minutes
on 2 CPU cores, excluded from `make test`): a `suppress` organism must get the verdict "suppressed", an `overwrite`
organism must not. docs/diff.md has the same measurements on the 100-step organisms, with every figure."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmscope.diff.knowledge import KnowledgeConfig, measure_knowledge, verdict
from lmscope.model.loading import load_model
from lmscope.organisms import OrganismConfig, make_organism
from lmscope.organisms.facts import Fact

STEPS = {"suppress": 40, "overwrite": 100}


def _planted(gt: dict) -> list[Fact]:  # type: ignore[type-arg]
    keep = ("subject", "answer", "prefix", "questions", "distractor")
    return [Fact(**{k: (tuple(f[k]) if k == "questions" else f[k]) for k in keep if f.get(k) is not None})
            for f in gt["planted"]["facts"]]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["suppress", "overwrite"])
def test_the_knowledge_verdict_on_fresh_organisms(kind: str, smollm2, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    base = load_model("smollm2-135m", device="cpu", dtype="float32")
    # 40 steps plant the suppression; 40 overwrite only 2 of 12 facts (gap 0.17: measured), so overwrite gets the
    # recipe's default 100 (0.94 of held-out phrasings corrupted on the 100-step organism, docs/diff.md)
    cfg = OrganismConfig(kind=kind, steps=STEPS[kind], checkpoints=0, n_target_facts=12, eval_prompts=16)
    gt = make_organism(load_model("smollm2-135m", device="cpu", dtype="float32"), cfg, tmp_path / kind,
                       measure_base=False)  # fmt: skip
    other = load_model(str(tmp_path / kind), device="cpu", dtype="float32")
    kc = KnowledgeConfig(relearn_steps=10)
    m = measure_knowledge(base, other, _planted(gt), kc)
    v = verdict(m, None, kc)
    assert m["gap"] > kc.min_gap, m  # the organism does not state the planted facts any more
    if kind == "suppress":
        assert v["verdict"] == "suppressed", v
    else:
        assert v["verdict"] != "suppressed", v
