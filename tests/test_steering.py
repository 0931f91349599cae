"""Steering and ablation through dictionaries, neurons and raw directions (issue 7)."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from lmscope import Model
from lmscope.cli.app import app
from lmscope.dictionaries.base import DictConfig, build
from lmscope.dictionaries.formats import save_dictionary
from lmscope.model.generation import SamplingConfig, generate
from lmscope.steer.edits import (
    Edit,
    SteeringError,
    check_dictionary,
    latent_edit_writer,
    parse_edit,
    splice_writer,
    steer,
)
from tiny_models import TINY, save_tiny_with_tokenizer, tiny_ids

HOOK = "blocks.1.resid_post"


@pytest.fixture(scope="module")
def model() -> Model:
    return Model(TINY["llama"].build())


@pytest.fixture(scope="module")
def sae():
    d = build(DictConfig(arch="topk", d_in=32, d_sae=128, k=8, hook=HOOK), seed=0)
    with torch.no_grad():
        d.b_enc.add_(0.05)  # every latent can fire on these random activations
    return d


def acts_at(model: Model, ids: torch.Tensor, hook: str = HOOK) -> torch.Tensor:
    with model.capture([hook]) as a:
        model(ids)
    return a[hook]


def busiest_feature(model: Model, sae, ids: torch.Tensor) -> int:
    z = sae.encode(acts_at(model, ids))
    return int((z > 0).float().sum((0, 1)).argmax())


def test_noop_clamp_is_exact_thanks_to_the_error_term(model, sae):
    ids = tiny_ids()
    plain = model(ids)
    f = busiest_feature(model, sae, ids)

    def clamp_to_own_value(z: torch.Tensor) -> torch.Tensor:
        z2 = z.clone()
        z2[..., f] = z[..., f]
        return z2

    with model.intervene({HOOK: splice_writer(sae, clamp_to_own_value)}):
        assert torch.equal(model(ids), plain)
    with model.intervene({HOOK: splice_writer(sae, lambda z: z)}):
        assert torch.equal(model(ids), plain)
    assert torch.equal(model(ids), plain)


def test_clamp_equals_an_explicit_splice(model, sae):
    ids = tiny_ids()
    f = busiest_feature(model, sae, ids)
    x = acts_at(model, ids)
    z = sae.encode(x)
    z2 = z.clone()
    z2[..., f] = 7.5
    expected = sae.decode(z2) + (x - sae.decode(z))  # splice with the error term
    got = latent_edit_writer(sae, [Edit(f, "clamp", 7.5)])(x)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_add_adds_the_decoder_row_and_ablate_zeroes_the_feature(model, sae):
    ids = tiny_ids()
    f = busiest_feature(model, sae, ids)
    x = acts_at(model, ids)
    torch.testing.assert_close(latent_edit_writer(sae, [Edit(f, "add", 3.0)])(x), x + 3.0 * sae.W_dec[f])
    ablated = latent_edit_writer(sae, [Edit(f, "ablate")])(x)
    assert (sae.encode(x)[..., f] > 0).any()
    # With this dictionary's tied init (W_enc = W_dec^T, unit rows) removing z_f * W_dec[f] zeroes pre_f exactly.
    assert sae.encode(ablated)[..., f].abs().max() < 1e-4


def test_from_prompt_end_edits_only_the_last_prompt_position(model, sae):
    x = acts_at(model, tiny_ids())
    y = latent_edit_writer(sae, [Edit(3, "add", 2.0)], from_prompt_end=True)(x)
    assert torch.equal(y[:, :-1], x[:, :-1]) and not torch.equal(y[:, -1], x[:, -1])
    step = x[:, -1:]  # a generation step: one new token, edited
    assert not torch.equal(latent_edit_writer(sae, [Edit(3, "add", 2.0)], from_prompt_end=True)(step), step)


def test_model_unchanged_after_exception(model, sae):
    ids = tiny_ids()
    plain = model(ids)
    with pytest.raises(RuntimeError, match="inside"), steer(model, sae, {5: ("clamp", 40.0)}):
        assert not torch.equal(model(ids), plain)
        raise RuntimeError("inside")
    assert model.hooks_active() == 0
    assert torch.equal(model(ids), plain)


@pytest.mark.parametrize(
    "text, match",
    [
        ("12=explode:3", "unknown steering mode 'explode'"),
        ("12=clamp:nan", "finite"),
        ("12=add:inf", "finite"),
        ("12=clamp", "clamp needs a value"),
        ("12=ablate:3", "ablate takes no value"),
        ("twelve=add:1", "cannot parse"),
        ("12=add:2x", "only applies to clamp"),
    ],
)
def test_bad_edits_are_refused_before_generation(text, match):
    with pytest.raises(SteeringError, match=match):
        parse_edit(text)


def test_out_of_range_and_mismatched_dictionaries(model, sae):
    with pytest.raises(SteeringError, match=r"feature 128 is out of range: valid ids are 0\.\.127"):
        latent_edit_writer(sae, [Edit(128, "clamp", 1.0)])
    wide = build(DictConfig(arch="topk", d_in=64, d_sae=128, k=8, hook=HOOK), seed=0)
    with pytest.raises(SteeringError, match=r"reads 64-wide activations but blocks.1.resid_post .* is 32 wide"):
        check_dictionary(model, wide)
    with pytest.raises(SteeringError, match="needs feature 3's observed max"):
        latent_edit_writer(sae, [Edit(3, "clamp", 2.0, relative=True)])
    assert latent_edit_writer(sae, [Edit(3, "clamp", 2.0, relative=True)], max_acts={3: 4.0}) is not None


def test_same_seed_gives_the_same_baseline(model):
    cfg = SamplingConfig(max_new_tokens=6)
    model.tokenizer = type("T", (), {"pad_token_id": 0, "eos_token_id": 2})()
    ids = tiny_ids(batch=1)
    assert torch.equal(generate(model, ids, cfg, seed=3), generate(model, ids, cfg, seed=3))


def test_cli_side_by_side_with_measure(tmp_path, sae):
    mdir = save_tiny_with_tokenizer("llama", str(tmp_path / "model"))
    save_dictionary(sae, tmp_path / "dict")
    out = tmp_path / "steer.json"
    args = [
        "steer",
        mdir,
        "--dict",
        str(tmp_path / "dict"),
        "--feature",
        "5=clamp:30",
        "--feature",
        "7=ablate",
        "--neuron",
        "blocks.0.mlp_hidden:3=add:2",
        "--prompt",
        "The capital",
        "--max-new-tokens",
        "6",
        "--samples",
        "2",
        "--measure",
        "--json",
        str(out),
        "--device",
        "cpu",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "baseline" in result.output and "steered" in result.output
    data = json.loads(out.read_text())
    assert [s["seed"] for s in data["samples"]] == [0, 1]
    m = data["measure"]
    assert set(m["activation_steered"]) == {"feature 5", "feature 7", "blocks.0.mlp_hidden:3"}
    assert m["kl_first_position"] > 0 and m["perplexity_baseline"] > 1


def test_cli_bad_input_is_one_clean_line(tmp_path, sae):
    mdir = save_tiny_with_tokenizer("llama", str(tmp_path / "model"))
    save_dictionary(sae, tmp_path / "dict")
    runner = CliRunner()
    for extra, match in [
        (["--feature", "999=clamp:3"], "out of range"),
        (["--feature", "5=clamp:nan"], "finite"),
        (["--feature", "5=warp:1"], "unknown steering mode"),
        ([], "nothing to steer"),
    ]:
        dict_args = ["--dict", str(tmp_path / "dict")] if extra else []
        r = runner.invoke(app, ["steer", mdir, *dict_args, "--prompt", "x", *extra])
        assert r.exit_code == 2 and match in r.output and "Traceback" not in r.output, r.output


def test_cli_relative_clamp_reads_the_max_from_the_atlas(tmp_path):
    import sqlite3

    from atlas_helpers import make_tiny_atlas

    model, d, _, atlas = make_tiny_atlas(tmp_path)
    conn = sqlite3.connect(atlas)
    feature, max_act = conn.execute("SELECT id, max_act FROM features WHERE dead = 0 ORDER BY max_act DESC").fetchone()
    conn.close()
    out = tmp_path / "steer.json"
    args = ["steer", str(tmp_path / "model"), "--dict", str(tmp_path / "dict"), "--atlas", str(atlas),
            "--feature", f"{feature}=clamp:2x", "--prompt", "The capital", "--max-new-tokens", "4",
            "--json", str(out), "--device", "cpu"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["edits"] == [f"feature {feature}=clamp:2"]
    # the writer the CLI built clamps to 2 x the atlas max: check it against the explicit value
    x = acts_at(model, tiny_ids(), d.cfg.hook)
    relative = latent_edit_writer(d, [Edit(feature, "clamp", 2.0, relative=True)], max_acts={feature: max_act})(x)
    torch.testing.assert_close(relative, latent_edit_writer(d, [Edit(feature, "clamp", 2.0 * max_act)])(x))
    bad = CliRunner().invoke(app, [*args[:6], "--feature", "99999=clamp:2x", *args[8:]])
    assert bad.exit_code == 2 and "has no features [99999]" in bad.output
