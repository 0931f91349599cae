"""Circuit diff on a change planted by hand: OTHER's layer-1 MLP reads its input twice as loud, so the layer-1
transcoder features (BASE's transcoders, the same for both graphs) must come out strengthened; the same model on
both sides changes nothing."""

from __future__ import annotations

import copy

import torch

from circuit_helpers import tiny_transcoders
from lmscope import Model
from lmscope.circuits import AttributionConfig
from lmscope.workflows.circuit_diff import circuit_diff
from tiny_models import TINY, tiny_ids


def test_a_louder_layer_strengthens_its_features_and_nothing_before_it() -> None:
    hf = TINY["llama"].build()
    base = Model(hf)
    other_hf = copy.deepcopy(hf)
    with torch.no_grad():
        other_hf.model.layers[1].post_attention_layernorm.weight.mul_(2.0)
    other = Model(other_hf)
    tcs = tiny_transcoders(base)
    cfg = AttributionConfig(max_feature_nodes=None, max_edges_per_row=None)
    r = circuit_diff(base, other, tcs, tiny_ids()[0][:10], cfg=cfg, top=50)
    assert r["strengthened"] and all(n["kind"] in ("feature", "error", "token") for n in r["strengthened"])
    layer1 = [n for n in r["strengthened"] if n["node"].startswith("L1 ")]
    assert layer1, r["strengthened"][:5]
    # the same model on both sides: nothing changes
    same = circuit_diff(base, Model(copy.deepcopy(hf)), tcs, tiny_ids()[0][:10], cfg=cfg)
    assert not same["strengthened"] and not same["weakened"] and not same["appeared"] and not same["vanished"]
    assert all(e["base"] == e["other"] for e in same["edges"])


def test_transcoders_meet_a_fine_tune_only_when_applied_to_it_knowingly() -> None:
    import pytest

    from lmscope.errors import CircuitError

    hf = TINY["llama"].build()
    base = Model(hf, spec="tiny-base")
    tcs = tiny_transcoders(base)
    for t in tcs.by_layer.values():
        t.cfg.model = "tiny-base"
    tcs.check(base)
    other = Model(copy.deepcopy(hf), spec="tiny-fine-tune")
    with pytest.raises(CircuitError, match="was trained on 'tiny-base'"):
        tcs.check(other)
    tcs.applied_to("tiny-fine-tune").check(other)
    with pytest.raises(CircuitError, match="was trained on"):
        tcs.check(other)  # the original set is unchanged
