"""Model specs, the loader and its error messages; hook-name errors; the generic fallback."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from lmscope import HookError, Model, ModelLoadError, load_model
from lmscope.errors import LmscopeError
from lmscope.model import interventions as iv
from lmscope.model.device import resolve_device, resolve_dtype
from lmscope.model.loading import check_gguf, resolve_spec
from tiny_models import TINY, save_tiny_with_tokenizer, tiny_generic, tiny_ids


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return save_tiny_with_tokenizer("llama", str(tmp_path_factory.mktemp("tiny-llama")))


def test_load_local_directory_matches_the_in_memory_model(tiny_dir):
    model = load_model(tiny_dir, device="cpu", dtype="float32")
    assert model.family.name == "llama" and model.n_layers == 3 and model.tokenizer is not None
    ids = tiny_ids()
    expected = TINY["llama"].build()(input_ids=ids).logits
    assert torch.equal(model(ids), expected.detach())


def test_dtype_is_applied(tiny_dir):
    assert load_model(tiny_dir, device="cpu", dtype="bfloat16").dtype == torch.bfloat16


def test_wrong_path_is_a_clear_error():
    with pytest.raises(ModelLoadError, match=r"no such model file or directory: ./does-not-exist"):
        load_model("./does-not-exist")
    with pytest.raises(ModelLoadError, match=r"GGUF file not found"):
        load_model("/nowhere/model.gguf")


def test_directory_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match=r"holds no config.json"):
        load_model(str(tmp_path))


def test_hub_id_offline_says_to_pass_a_local_path(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    assert resolve_spec("some-org/some-model") == ("hub", "some-org/some-model")
    with pytest.raises(ModelLoadError, match=r"pass the local path"):
        load_model("some-org/some-model")


def test_trust_remote_code_is_refused_with_a_reason(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "my_custom_lm", "auto_map": {"AutoModelForCausalLM": "modeling_custom.MyLM"}})
    )
    with pytest.raises(ModelLoadError, match=r"needs trust_remote_code.*modeling_custom.MyLM"):
        load_model(str(tmp_path))


def _write_gguf(path: Path, quant: gguf.GGMLQuantizationType) -> None:
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    _, type_size = gguf.GGML_QUANT_SIZES[quant]
    w.add_tensor("token_embd.weight", np.zeros((4, 2 * type_size), dtype=np.uint8), raw_dtype=quant)
    w.add_tensor("output_norm.weight", np.ones(4, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_unsupported_gguf_quantisation(tmp_path):
    path = tmp_path / "bad.gguf"
    _write_gguf(path, gguf.GGMLQuantizationType.Q8_1)
    with pytest.raises(ModelLoadError, match=r"quantisation type\(s\) Q8_1, which cannot be dequantised"):
        load_model(str(path))
    _write_gguf(path, gguf.GGMLQuantizationType.Q4_1)
    check_gguf(path)  # a supported type passes the check


def test_corrupt_gguf(tmp_path):
    path = tmp_path / "junk.gguf"
    path.write_bytes(b"not a gguf file at all")
    with pytest.raises(ModelLoadError, match="not a readable GGUF file"):
        load_model(str(path))


def test_device_and_dtype_resolution():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda", "mps")
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    with pytest.raises(LmscopeError, match="unknown dtype 'float8'"):
        resolve_dtype("float8")
    if not torch.cuda.is_available():
        with pytest.raises(LmscopeError, match="CUDA is not available"):
            resolve_device("cuda")


def test_unknown_hook_lists_closest_names():
    model = Model(TINY["llama"].build())
    with pytest.raises(HookError, match=r"closest valid names: blocks.1.resid_post"):
        model.resolve("blocks.1.resid_pots")
    with pytest.raises(HookError, match=r"layer 7 is out of range; this model has 3 blocks"):
        model.resolve("blocks.7.mlp_out")
    with pytest.raises(HookError, match="unknown hook"), model.capture(["nonsense"]):
        pass
    assert model.hooks_active() == 0


def test_bad_name_in_intervene_installs_nothing():
    model = Model(TINY["llama"].build())
    edits = {"blocks.0.resid_post": iv.scale(2.0), "blocks.0.bogus": iv.scale(2.0)}
    with pytest.raises(HookError), model.intervene(edits):
        pass
    assert model.hooks_active() == 0


def test_intervention_shape_change_is_refused():
    model = Model(TINY["llama"].build())
    with (
        pytest.raises(HookError, match="must return a tensor of shape"),
        model.intervene({"blocks.0.resid_post": lambda x: x[..., :3]}),
    ):
        model(tiny_ids())
    assert model.hooks_active() == 0


def test_generic_fallback_offers_residual_hooks_and_lists_paths():
    hf = tiny_generic()
    model = Model(hf)
    assert model.family.name == "generic"
    assert model.hook_names() == [f"blocks.{i}.{k}" for i in range(2) for k in ("resid_pre", "resid_post")]
    ids = tiny_ids()
    with torch.no_grad():
        hidden = hf(input_ids=ids, output_hidden_states=True).hidden_states
    with model.capture(["blocks.0.resid_post"]) as acts:
        model(ids)
    assert torch.equal(acts["blocks.0.resid_post"], hidden[1])
    with pytest.raises(HookError, match=r"generic fallback offers only resid_pre.*Module paths seen: .*decoder.layers"):
        model.resolve("blocks.0.attn_out")


def test_no_block_list_names_the_paths():
    class Weird(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.config = TINY["llama"].build().config.__class__(model_type="weird")
            self.config.model_type = "weird"
            self.body = torch.nn.Linear(4, 4)

    with pytest.raises(HookError, match=r"cannot find the transformer blocks.*Module paths seen: body"):
        Model(Weird())


def test_incomplete_gguf_cache_is_ignored(tmp_path, monkeypatch):
    from lmscope.model.loading import _gguf_cache

    monkeypatch.setenv("LMSCOPE_CACHE", str(tmp_path))
    sha = "ab" * 32
    target = tmp_path / "gguf" / sha[:32]
    target.mkdir(parents=True)
    (target / "model.safetensors").write_bytes(b"half-written")
    assert _gguf_cache(Path("x.gguf"), sha) is None  # no completion marker
    (target / "lmscope-gguf-cache.json").write_text(json.dumps({"sha256": "cd" * 32}))
    assert _gguf_cache(Path("x.gguf"), sha) is None  # a marker for other contents
    (target / "lmscope-gguf-cache.json").write_text(json.dumps({"sha256": sha}))
    assert _gguf_cache(Path("x.gguf"), sha) == target
