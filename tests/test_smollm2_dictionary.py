"""A real dictionary on the embedded default model: quality (issue 4) and causal steering (issue 7)."""

from __future__ import annotations

import json

import pytest
import torch

from lmscope.activations.store import ActivationStore
from lmscope.model.generation import SamplingConfig, prompt_ids
from lmscope.steer.edits import Edit, latent_edit_writer, steer
from lmscope.steer.measure import run_steering, token_rate

pytestmark = pytest.mark.smollm2
HOOK = "blocks.6.resid_post"


def test_topk_dictionary_quality_on_smollm2(smollm2_sae):
    results = json.loads((smollm2_sae.run_dir / "eval.json").read_text())
    assert results["hook"] == HOOK
    assert results["fvu"] < 0.3, results
    assert results["dead_frac"] < 0.05, results
    assert results["ce_recovered"] > 0.8, results
    # the error term makes the splice exact
    assert abs(results["ce_spliced_with_error"] - results["ce_clean"]) < 1e-3


def _direct_logit_effects(model, d) -> torch.Tensor:
    """[d_sae, vocab]: each decoder row through the final norm's weight and the unembedding."""
    w_norm = model.hf.model.norm.weight.detach()
    return (d.W_dec.detach() * w_norm) @ model.hf.lm_head.weight.detach().T


def test_clamping_a_feature_raises_the_tokens_it_promotes(smollm2, smollm2_last_layer_sae):
    job = smollm2_last_layer_sae
    d, hook = job.dictionary(), job.hook
    x = next(iter(ActivationStore.open(job.run_dir / "acts", hooks=[hook]).batches(batch_size=8192, shuffle=False)))
    with torch.no_grad():
        z = d.encode(x[hook])
    max_act, density = z.amax(0), (z > 0).float().mean(0)
    effects = _direct_logit_effects(smollm2, d)  # what the atlas stores as logit effects
    top_vals, top_ids = effects.topk(10, dim=-1)
    live = density > 1e-3
    feature = int(torch.where(live, top_vals[:, 0], torch.full_like(top_vals[:, 0], -1e9)).argmax())
    promoted = {int(t) for t in top_ids[feature]}
    value = 8.0 * float(max_act[feature])
    prompt = "The following text is"
    result = run_steering(
        smollm2,
        {hook: latent_edit_writer(d, [Edit(feature, "clamp", value)])},
        prompt,
        prompt_ids(smollm2, prompt),
        [f"{feature}=clamp:{value:.1f}"],
        SamplingConfig(max_new_tokens=16, temperature=0.8),
        samples=3,
        seed=0,
    )
    base, steered = token_rate(result, promoted)
    tokens = [smollm2.tokenizer.decode([t]) for t in promoted]
    assert steered >= base + 0.3, (feature, tokens, base, steered, [s.steered for s in result.samples])


def test_ablating_a_feature_zeroes_its_read_back_activation(smollm2, smollm2_sae):
    d = smollm2_sae.dictionary()
    ids = smollm2.encode("import os\nimport sys\n\ndef main(argv):\n    for name in os.listdir(argv[1]):\n")
    with smollm2.capture([HOOK], stop_early=False) as clean:
        plain = smollm2(ids)
    z = d.encode(clean[HOOK])
    feature = int(z[0].amax(0).argmax())  # the feature firing most strongly on this text
    z = z.detach()
    assert float(z[0, :, feature].max()) > 1.0
    with steer(smollm2, d, {feature: ("ablate", 0.0)}), smollm2.capture([HOOK], stop_early=False) as edited:
        ablated = smollm2(ids)
    read_back = d.encode(edited[HOOK])[0, :, feature].detach()
    assert float(read_back.abs().max()) < 0.1 * float(z[0, :, feature].max())
    assert not torch.equal(ablated, plain)
    assert torch.equal(smollm2(ids), plain) and smollm2.hooks_active() == 0
