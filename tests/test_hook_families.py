"""The hook naming scheme on a tiny random model of every supported family (issue 2's core guarantees)."""

from __future__ import annotations

import functools
import types

import pytest
import torch

from lmscope import HookError, Model
from lmscope.model import interventions as iv
from tiny_models import TINY, Tiny, tiny_ids

FAMILIES = sorted(TINY)
ADDITIVE = sorted(f for f, t in TINY.items() if t.sequential or t.parallel)
POST_LN = sorted(f for f, t in TINY.items() if not (t.sequential or t.parallel))
WITH_RESID_MID = sorted(f for f, t in TINY.items() if not t.parallel)


@functools.cache
def built(family: str) -> tuple[Tiny, torch.nn.Module, Model]:
    spec = TINY[family]
    hf = spec.build()
    return spec, hf, Model(hf)


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request: pytest.FixtureRequest) -> tuple[Tiny, torch.nn.Module, Model]:
    return built(request.param)


def hf_logits(hf: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return hf(input_ids=ids).logits


def test_capture_leaves_logits_bit_identical(tiny):
    _, hf, model = tiny
    ids = tiny_ids()
    plain = hf_logits(hf, ids)
    with model.capture(model.hook_names(), stop_early=False) as acts:
        logits = model(ids)
    assert torch.equal(logits, plain)
    assert set(acts) == set(model.hook_names())
    raw = acts["logits"]
    if model.logit_softcap:  # Gemma 2: HF softcaps after lm_head, outside any module
        cap = model.logit_softcap
        raw = torch.tanh(raw / cap) * cap
    assert torch.equal(raw, plain)
    assert model.hooks_active() == 0


def test_logits_identical_after_intervene_exits(tiny):
    _, hf, model = tiny
    ids = tiny_ids()
    plain = hf_logits(hf, ids)
    with model.intervene({"blocks.1.resid_post": iv.zero_ablate()}):
        edited = model(ids)
    assert not torch.equal(edited, plain)
    assert torch.equal(hf_logits(hf, ids), plain)
    assert torch.equal(model(ids), plain)
    assert model.hooks_active() == 0


def test_resid_post_matches_hf_hidden_states(tiny):
    spec, hf, model = tiny
    ids = tiny_ids()
    with torch.no_grad():
        hidden = hf(input_ids=ids, output_hidden_states=True).hidden_states
    assert len(hidden) == model.n_layers + 1
    layers = range(model.n_layers - 1) if spec.hidden_states_final_norm else range(model.n_layers)
    with model.capture([f"blocks.{i}.resid_post" for i in layers], stop_early=False) as acts:
        model(ids)
    for i in layers:
        assert torch.equal(acts[f"blocks.{i}.resid_post"], hidden[i + 1]), f"layer {i}"
    # resid_pre of block 0 is HF's hidden_states[0] (embeddings after any scaling/positions).
    with model.capture(["blocks.0.resid_pre"]) as acts:
        model(ids)
    assert torch.equal(acts["blocks.0.resid_pre"], hidden[0])


@pytest.mark.parametrize("family", ADDITIVE)
def test_residual_decomposition(family):
    spec, _, model = built(family)
    ids = tiny_ids()
    kinds = ["resid_pre", "attn_out", "mlp_out", "resid_post"] + (["resid_mid"] if spec.sequential else [])
    hooks = [f"blocks.{i}.{k}" for i in range(model.n_layers) for k in kinds]
    with model.capture(hooks) as acts:
        model(ids)
    for i in range(model.n_layers):
        a = {k: acts[f"blocks.{i}.{k}"] for k in kinds}
        if spec.sequential:
            torch.testing.assert_close(a["resid_mid"], a["resid_pre"] + a["attn_out"], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(a["resid_post"], a["resid_mid"] + a["mlp_out"], rtol=1e-5, atol=1e-5)
        else:
            torch.testing.assert_close(
                a["resid_post"], a["resid_pre"] + a["attn_out"] + a["mlp_out"], rtol=1e-5, atol=1e-5
            )


def test_adding_zero_changes_nothing_at_every_hook(tiny):
    _, hf, model = tiny
    ids = tiny_ids()
    plain = hf_logits(hf, ids)
    with model.capture(model.hook_names(), stop_early=False) as acts:
        model(ids)
    for name in model.hook_names():
        zero = torch.zeros(acts[name].shape[-1])
        with model.intervene({name: iv.add(zero)}):
            assert torch.equal(model(ids), plain), name


def _first(out: object) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out  # type: ignore[return-value]


def test_zero_ablating_mlp_out_matches_plain_pytorch(tiny):
    """lmscope's mlp_out (or, for post-LN families, mlp_hidden) against a module named by hand in tiny_models.py,
    not taken from lmscope's own hook map: a wrong map gives different logits."""
    spec, hf, model = tiny
    ids = tiny_ids()
    plain = hf_logits(hf, ids)
    if spec.mlp_contribution is None:
        # Post-LN families have no additive mlp_out; ablate the MLP neurons: the down projection's input.
        hook = "blocks.0.mlp_hidden"
        handle = hf.get_submodule(spec.mlp_down).register_forward_pre_hook(
            lambda _m, args: (torch.zeros_like(args[0]), *args[1:])
        )
    else:
        hook = "blocks.0.mlp_out"
        handle = hf.get_submodule(spec.mlp_contribution).register_forward_hook(
            lambda _m, _a, out: torch.zeros_like(_first(out))
        )
    try:
        by_hand = hf_logits(hf, ids)
    finally:
        handle.remove()
    with model.intervene({hook: iv.zero_ablate()}):
        ours = model(ids)
    assert not torch.allclose(ours, plain)
    assert torch.equal(ours, by_hand)


def test_mlp_hidden_is_the_input_of_the_down_projection(tiny):
    """blocks.{i}.mlp_hidden, captured and edited, is the input of the MLP's down projection (named by hand)."""
    spec, hf, model = tiny
    ids = tiny_ids()
    seen: list[torch.Tensor] = []
    down = hf.get_submodule(spec.mlp_down)
    handle = down.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()))
    try:
        with model.capture(["blocks.0.mlp_hidden"], stop_early=False) as acts:
            model(ids)
    finally:
        handle.remove()
    (neurons,) = seen
    assert torch.equal(acts["blocks.0.mlp_hidden"], neurons)
    # an edit: doubling the neurons is doubling the down projection's input
    handle = down.register_forward_pre_hook(lambda _m, args: (2 * args[0], *args[1:]))
    try:
        by_hand = hf_logits(hf, ids)
    finally:
        handle.remove()
    with model.intervene({"blocks.0.mlp_hidden": iv.scale(2.0)}):
        ours = model(ids)
    assert not torch.allclose(ours, hf_logits(hf, ids))
    assert torch.equal(ours, by_hand)


@pytest.mark.parametrize("family", ADDITIVE)
def test_mlp_out_capture_is_the_hand_named_module_output(family):
    spec, hf, model = built(family)
    assert spec.mlp_contribution is not None
    seen: list[torch.Tensor] = []
    handle = hf.get_submodule(spec.mlp_contribution).register_forward_hook(
        lambda _m, _a, out: seen.append(_first(out).detach().clone())
    )
    try:
        with model.capture(["blocks.0.mlp_out"], stop_early=False) as acts:
            model(tiny_ids())
    finally:
        handle.remove()
    (contribution,) = seen
    assert torch.equal(acts["blocks.0.mlp_out"], contribution)


def test_every_supported_family_has_a_tiny_model():
    from lmscope.model.families import families

    # gemma3_text is served by the gemma3 family; the tiny gpt_neox_sequential is gpt_neox without parallel residual
    assert set(families().values()) <= {f.removesuffix("_sequential") for f in FAMILIES}
    for family in FAMILIES:
        assert built(family)[2].family.name == family.removesuffix("_sequential")


@pytest.mark.parametrize("family", POST_LN)
def test_post_ln_families_refuse_additive_hooks(family):
    _, _, model = built(family)
    for kind in ("attn_out", "mlp_out"):
        with pytest.raises(HookError, match="post-LayerNorm"):
            model.resolve(f"blocks.0.{kind}")


def test_parallel_neox_refuses_resid_mid():
    _, _, model = built("gpt_neox")
    with pytest.raises(HookError, match="in parallel"):
        model.resolve("blocks.1.resid_mid")


@pytest.mark.parametrize("family", WITH_RESID_MID)
def test_resid_mid_edit_reaches_mlp_and_residual(family):
    spec, _, model = built(family)
    ids = tiny_ids()
    vec = torch.randn(model.d_model)
    hooks = ["blocks.0.resid_mid", "blocks.0.mlp_in", "blocks.0.resid_post"]
    with model.capture(hooks) as clean:
        model(ids)
    with model.intervene({"blocks.0.resid_mid": iv.add(vec)}), model.capture(hooks) as edited:
        model(ids)
    # The capture sees the edited value, and the edit flows into the MLP input.
    torch.testing.assert_close(edited["blocks.0.resid_mid"], clean["blocks.0.resid_mid"] + vec, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(edited["blocks.0.mlp_in"], clean["blocks.0.mlp_in"])
    if spec.sequential:
        # ... and into the residual branch: resid_post = edited resid_mid + the MLP's (new) output.
        with model.intervene({"blocks.0.resid_mid": iv.add(vec)}), model.capture(["blocks.0.mlp_out"]) as m:
            model(ids)
        torch.testing.assert_close(
            edited["blocks.0.resid_post"], edited["blocks.0.resid_mid"] + m["blocks.0.mlp_out"], atol=1e-5, rtol=1e-5
        )


def test_early_stop_gives_same_activations(tiny):
    _, _, model = tiny
    ids = tiny_ids()
    with model.capture(["blocks.1.resid_post", "blocks.0.mlp_in"], stop_early=False) as full:
        model(ids)
    with model.capture(["blocks.1.resid_post", "blocks.0.mlp_in"]) as early:
        assert model(ids) is None
    for k in full:
        assert torch.equal(full[k], early[k])


def test_hooks_removed_after_exception(tiny):
    _, _, model = tiny
    with (
        pytest.raises(RuntimeError, match="boom"),
        model.intervene({"blocks.0.resid_post": iv.scale(2.0)}),
        model.capture(["blocks.0.resid_pre"]),
    ):
        raise RuntimeError("boom")
    assert model.hooks_active() == 0


def test_family_registry_refuses_a_name_or_model_type_twice(monkeypatch: pytest.MonkeyPatch) -> None:
    import lmscope.model.families as fam

    monkeypatch.setattr(fam, "_BUILDERS", dict(fam._BUILDERS))  # register into a copy, not the real registry
    monkeypatch.setattr(fam, "_MODEL_TYPES", dict(fam._MODEL_TYPES))
    before = fam.families()
    assert before["gemma3_text"] == "gemma3" and before["llama"] == "llama"
    llama = fam.family_for(types.SimpleNamespace(model_type="llama"))
    assert llama is not None and llama.name == "llama"
    with pytest.raises(fam.FamilyRegistryError, match=r"family named 'llama' is already registered"):
        fam.register_family("llama", model_types=["my_llama"])(lambda _: llama)
    with pytest.raises(fam.FamilyRegistryError, match=r"model_type 'gemma3_text' \(by 'gemma3'\) is already"):
        fam.register_family("my_gemma", model_types=["my_gemma", "gemma3_text"])(lambda _: llama)
    with pytest.raises(fam.FamilyRegistryError, match=r"'generic' is already registered"):
        fam.register_family("generic")(lambda _: llama)
    assert fam.families() == before  # a refused registration leaves nothing behind
    fam.register_family("my_family", model_types=["my_type"])(lambda _: llama)
    assert fam.family_for(types.SimpleNamespace(model_type="my_type")) is llama
    with pytest.raises(fam.FamilyRegistryError, match=r"'my_type' \(by 'my_family'\)"):
        fam.register_family("my_other", model_types=["my_type"])(lambda _: llama)
    assert fam.family_for(types.SimpleNamespace(model_type="unknown_arch")) is None
