"""The demo's steering search (workflows/steer_search.py) on a tiny random model with a planted feature, and the
measurements it relies on (steer/measure.py: per-sample rates, the paired interval, batched sampling)."""

from __future__ import annotations

import dataclasses
import json
import shlex

import pytest
import torch
from scipy import stats
from typer.testing import CliRunner

import lmscope
from lmscope.atlas.logits import logit_lens
from lmscope.cli.app import app
from lmscope.dictionaries import DictConfig, build
from lmscope.dictionaries.formats import save_dictionary
from lmscope.model.generation import SamplingConfig, prompt_ids, sample_batch
from lmscope.steer.measure import continuation_nll, paired_rise, rate_of, run_steering, sample_token_rates
from lmscope.workflows.steer_search import (
    Candidate,
    SteerSearchConfig,
    _mean_nll,
    atlas_candidates,
    own_tokens,
    search_steering,
    steer_command,
)
from tiny_models import save_tiny_with_tokenizer

HOOK = "blocks.2.resid_post"  # the tiny llama's last block: a decoder row reaches the logits directly
PLANTED, SUPPRESSOR = 3, 5
CFG = SteerSearchConfig(prompt="The capital", finalists=3, strengths=(2.0,), screen_strength=2.0, samples=8,
                        max_new_tokens=6, confirm_seed=7, seconds=120, max_nll_rise=50.0)  # fmt: skip


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """(model dir, model, dictionary dir, dictionary, token): latent PLANTED writes the direction that makes
    `token` the model's next token; SUPPRESSOR writes its opposite."""
    root = tmp_path_factory.mktemp("planted")
    mdir = save_tiny_with_tokenizer("llama", str(root / "model"))
    model = lmscope.load_model(mdir, device="cpu", dtype="float32")
    with torch.no_grad():  # sharper logits than a random init's nearly flat ones, so one direction can win them
        model.hf.get_submodule(model.hook_points["final_norm"].module).weight.mul_(20)
    model.hf.save_pretrained(mdir)
    lens = logit_lens(model)
    assert lens is not None
    tok = model.tokenizer
    special = set(tok.all_special_ids)
    # a token that its own (norm-adjusted) unembedding row promotes above every other
    token = next(
        t for t in range(lens.W_U.shape[0])
        if t not in special and tok.decode([t]).strip() and int((lens.W_U @ lens.W_U[t]).argmax()) == t
    )  # fmt: skip
    d = build(DictConfig(arch="topk", d_in=32, d_sae=16, k=4, hook=HOOK, model="tiny-llama"), seed=0)
    direction = lens.W_U[token] / lens.gain
    with torch.no_grad():
        d.W_dec[PLANTED] = direction / direction.norm()
        d.W_dec[SUPPRESSOR] = -direction / direction.norm()
    save_dictionary(d, root / "dict")
    return mdir, model, root / "dict", d, token


def _candidates(token: int) -> list[Candidate]:
    others = frozenset({token + 1, token + 2})
    return [Candidate(0, 10.0, others), Candidate(PLANTED, 10.0, frozenset({token})),
            Candidate(SUPPRESSOR, 10.0, frozenset({token})), Candidate(9, 10.0, others)]  # fmt: skip


def test_search_finds_the_planted_feature_and_the_command_reproduces_its_texts(planted):
    mdir, model, ddir, d, token = planted
    threads = torch.get_num_threads()
    result = search_steering(model, d, HOOK, _candidates(token), CFG)
    assert torch.get_num_threads() == threads  # the search's one thread is undone
    assert result["found"] and result["feature"] == PLANTED and result["value"] == 20.0
    assert result["steered"] > 0.8 > 0.2 > result["baseline"]
    assert result["rise_low"] > 0 and result["samples_up"] >= 7 and result["samples"] == 8
    assert len(result["per_sample"]) == 8 and result["tokens"] == [model.tokenizer.decode([token])]
    assert result["kl"] > 0 and result["perplexity_steered"] > result["perplexity_baseline"] > 1
    search = result["search"]
    assert search["screened"][0]["feature"] == PLANTED  # the screen ranks it first
    assert SUPPRESSOR not in {s["feature"] for s in search["screened"]}  # it lowers its token: never a finalist
    assert not search["stopped_at_time_cap"] and search["trials"][0]["feature"] == PLANTED

    # The printed command gives exactly the confirmation's texts and measures.
    command = steer_command(mdir, ddir, result)
    assert "--feature 3=clamp:20 " in command and "--from-prompt-end" in command and "--batch" in command
    out = ddir.parent / "steer.json"
    args = [*shlex.split(command)[1:], "--device", "cpu", "--dtype", "float32", "--json", str(out)]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    data = json.loads(out.read_text())
    assert data["batched"] and len(data["samples"]) == 8
    assert data["samples"][0]["steered"] == result["steered_text"]
    assert data["samples"][0]["baseline"] == result["baseline_text"]
    assert data["measure"]["perplexity_steered"] == pytest.approx(result["perplexity_steered"])
    assert data["measure"]["kl_first_position"] == pytest.approx(result["kl"])


def test_when_nothing_qualifies_the_best_figures_are_still_reported(planted):
    _, model, _, d, token = planted
    # no fluency cost is acceptable: the planted feature's rise is measured but cannot qualify
    cfg = dataclasses.replace(CFG, max_nll_rise=0.0, confirm_tries=1)
    result = search_steering(model, d, HOOK, _candidates(token), cfg)
    assert not result["found"]
    assert result["feature"] == PLANTED and result["rise"] > 0.5 and "steered_text" in result
    # no candidates at all: an honest empty result
    empty = search_steering(model, d, HOOK, [], CFG)
    assert empty == {"found": False, "search": empty["search"]} and empty["search"]["candidates"] == 0


def test_own_tokens_drop_whitespace_special_and_generic_tokens(planted):
    _, model, _, _, _ = planted
    tok = model.tokenizer
    space = next(t for t in range(3, len(tok)) if not tok.decode([t]).strip())
    words = [t for t in range(3, len(tok)) if tok.decode([t]).strip()][:3]
    got = own_tokens(tok, [words[0], space, tok.eos_token_id], [words[1], words[2]], generic={words[2]})
    assert got == frozenset({words[0], words[1]})


def test_atlas_candidates_are_densest_first_with_their_tokens(tmp_path):
    from atlas_helpers import make_tiny_atlas
    from lmscope.atlas.schema import open_atlas

    model, _, _, atlas = make_tiny_atlas(tmp_path, labels=True)
    conn = open_atlas(atlas, readonly=True)
    try:
        cands = atlas_candidates(conn, model.tokenizer, SteerSearchConfig(pool=5, min_density=0, max_density=1))
    finally:
        conn.close()
    assert 0 < len(cands) <= 5
    assert [c.density for c in cands] == sorted((c.density for c in cands), reverse=True)
    assert all(c.tokens and c.max_act > 0 for c in cands)
    assert all(model.tokenizer.decode([t]).strip() for c in cands for t in c.tokens)


def test_paired_rise_is_the_paired_t_interval():
    pairs = [(0.1, 0.3), (0.0, 0.4), (0.2, 0.1), (0.0, 0.5)]
    r = paired_rise(pairs)
    diffs = [s - b for b, s in pairs]
    lo, hi = stats.t.interval(0.95, len(diffs) - 1, loc=sum(diffs) / 4, scale=stats.sem(diffs))
    assert r.mean == pytest.approx(0.25) and (r.low, r.high) == (pytest.approx(lo), pytest.approx(hi))
    assert (r.up, r.down, r.n) == (3, 1, 4) and r.baseline == pytest.approx(0.075)
    assert not r.clearly_up() and lo < 0
    assert paired_rise([(0.0, 0.5)] * 3).clearly_up()  # no spread: the interval is the point
    assert not paired_rise([(0.0, 0.5)]).clearly_up()  # one sample says nothing about the noise
    assert rate_of([1, 2, 3, 2], {2}) == 0.5 and rate_of([], {2}) == 0.0


def test_batched_samples_are_seeded_and_shared_by_both_sides(planted):
    _, model, _, _, token = planted
    ids = prompt_ids(model, "The capital")
    cfg = SamplingConfig(max_new_tokens=6)
    a, b = sample_batch(model, ids, cfg, 3, 4), sample_batch(model, ids, cfg, 3, 4)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert len({tuple(x.tolist()) for x in a}) > 1  # the rows are different samples
    # with an edit that changes nothing, the steered rows are the baseline rows
    result = run_steering(model, {HOOK: lambda x: x}, "The capital", ids, ["noop"], cfg, samples=4, seed=3, batch=True)
    assert result.batched and all(s.baseline_ids == s.steered_ids for s in result.samples)
    assert [s.baseline_ids for s in result.samples] == [x.tolist() for x in a]
    assert sample_token_rates(result, {token}) == [(rate_of(x.tolist(), {token}),) * 2 for x in a]
    # the search's batched NLL (right-padded rows of different lengths) is `continuation_nll` row by row
    rows = [a[0], a[1][:2], a[2][:4]]
    one_by_one = sum(continuation_nll(model, ids, r) for r in rows) / len(rows)
    assert _mean_nll(model, ids, rows) == pytest.approx(one_by_one, rel=1e-5)


def test_the_demo_prints_the_rise_its_interval_and_the_fluency_cost():
    from lmscope.cli.common import console
    from lmscope.cli.demo_cmd import print_steer

    search = {"candidates": 512, "trials": [{}] * 11, "seconds": 61.2, "stopped_at_time_cap": False}
    st = {"found": True, "feature": 4426, "label": "digits [0-9]", "value": 11.4, "multiple": 3.0,
          "from_prompt_end": True, "prompt": "Here is a short example:", "samples": 16, "tokens": ["0", "8"],
          "baseline": 0.027, "steered": 0.184, "rise": 0.156, "rise_low": 0.092, "rise_high": 0.221,
          "samples_up": 16, "samples_down": 0, "perplexity_baseline": 5.82, "perplexity_steered": 14.42, "kl": 0.39,
          "baseline_text": " [x] ok", "steered_text": " 2020", "command": "lmscope steer m --feature 4426=clamp:11.4",
          "search": search}  # fmt: skip
    with console.capture() as cap:
        print_steer(st)
    out = " ".join(cap.get().split())
    assert "Try steering. Measured just now: clamping feature 4426 (digits [0-9]) to 11.4 (3× its max)" in out
    assert "from 2.7% to 18.4% of the generated tokens (+15.6 points, 95% interval +9.2 to +22.1; up in 16" in out
    assert "perplexity 5.8 → 14.4" in out and "KL 0.39" in out and "11 trials, 61 s" in out
    assert "' [x] ok'" in out and "lmscope steer m --feature 4426=clamp:11.4" in out  # data is not markup
    with console.capture() as cap:
        print_steer({**st, "found": False, "search": {**search, "stopped_at_time_cap": True}})
    out = " ".join(cap.get().split())
    assert "no feature's clamp raised its own tokens clearly above the sample noise" in out
    assert "the time cap stopped the search" in out and "The best measured: clamping feature 4426" in out
    with console.capture() as cap:
        print_steer({"found": False, "search": {**search, "trials": []}})
    assert "no candidate feature" in cap.get()
