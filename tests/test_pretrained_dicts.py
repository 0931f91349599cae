"""Someone else's dictionary in every command: format detection (lmscope, SAELens v5/v6, sparsify, Gemma Scope),
hook names translated both ways (refused where there is no exact equal), `lmscope convert` round trips, and SAELens
files written in SAELens's own layout for a tiny model's TransformerLens hook names run through `lmscope eval` and
`lmscope atlas` from the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from lmscope.dictionaries import DictConfig, build
from lmscope.dictionaries.base import FormatError
from lmscope.dictionaries.formats import load_saelens, load_sparsify, save_dictionary
from lmscope.dictionaries.pretrained import convert_dictionary, detect_format, open_dictionary
from lmscope.errors import HookError
from lmscope.model import hook_names

INTEROP = Path(__file__).parent / "fixtures" / "interop"
runner = CliRunner()


# ------------------------------------------------------------------------------------------------ hook names
@pytest.mark.parametrize(("tl", "ours"), [
    ("blocks.6.hook_resid_pre", "blocks.6.resid_pre"), ("blocks.6.hook_resid_mid", "blocks.6.resid_mid"),
    ("blocks.6.hook_resid_post", "blocks.6.resid_post"), ("blocks.0.hook_attn_out", "blocks.0.attn_out"),
    ("blocks.11.hook_mlp_out", "blocks.11.mlp_out"), ("blocks.3.mlp.hook_post", "blocks.3.mlp_hidden"),
])  # fmt: skip
def test_transformerlens_names_map_both_ways(tl: str, ours: str) -> None:
    assert hook_names.from_transformerlens(tl) == ours == hook_names.to_lmscope(tl)
    assert hook_names.to_transformerlens(ours) == tl


@pytest.mark.parametrize(("tl", "why"), [
    ("blocks.6.ln2.hook_normalized", "before its gain"), ("blocks.6.ln1.hook_normalized", "before its gain"),
    ("blocks.6.mlp.hook_pre", "pre-activation"), ("blocks.6.attn.hook_z", "per-head"),
    ("blocks.6.hook_foo", "knows no equal"), ("embed.hook_embed", "not a TransformerLens block hook"),
])  # fmt: skip
def test_transformerlens_names_without_an_exact_equal_are_refused_with_the_reason(tl: str, why: str) -> None:
    with pytest.raises(HookError, match=why):
        hook_names.from_transformerlens(tl)


def test_sparsify_module_paths() -> None:
    assert hook_names.from_sparsify("layers.6") == ("blocks.6.resid_post", None)
    assert hook_names.from_sparsify("model.layers.6.mlp") == ("blocks.6.mlp_out", None)
    assert hook_names.from_sparsify("transformer.h.2.attn") == ("blocks.2.attn_out", None)
    assert hook_names.from_sparsify("layers.3.mlp", transcoder=True) == ("blocks.3.mlp_in", "blocks.3.mlp_out")
    with pytest.raises(HookError, match="MLP's input to its output"):
        hook_names.from_sparsify("layers.3", transcoder=True)
    with pytest.raises(HookError, match="not a decoder layer"):
        hook_names.from_sparsify("embed_tokens")
    with pytest.raises(HookError, match="no TransformerLens equal"):
        hook_names.to_transformerlens("blocks.3.mlp_in")


# ------------------------------------------------------------------------------------------------ formats
def _gemma(tmp_path: Path, name: str = "params.npz") -> tuple[Path, torch.nn.Module]:
    d = build(DictConfig(arch="jumprelu", d_in=8, d_sae=24, apply_b_dec_to_input=False), seed=3)
    with torch.no_grad():
        d.threshold.copy_(torch.rand(24) * 0.2)
    arrays = {k: v.detach().numpy() for k, v in d.state_dict().items()}
    path = tmp_path / name
    if name.endswith(".npz"):
        np.savez(path, **arrays)
    else:
        save_file({k: torch.from_numpy(v.copy()) for k, v in arrays.items()}, str(path))
    return path, d


def test_every_format_is_recognised_and_loads_with_lmscope_hook_names(tmp_path: Path) -> None:
    sl = open_dictionary(INTEROP / "saelens6/topk")
    assert detect_format(INTEROP / "saelens6/topk") == "saelens"
    assert sl.cfg.hook == "blocks.3.resid_pre" and sl.metadata["training"]["hook_as_saved"] == "blocks.3.hook_resid_pre"
    x = torch.randn(5, 8)
    with torch.no_grad():
        assert torch.equal(sl.encode(x), load_saelens(INTEROP / "saelens6/topk").encode(x))
    assert open_dictionary(INTEROP / "saelens5/topk").cfg.hook == "blocks.3.resid_pre"
    sp = INTEROP / "sparsify/sae"
    assert detect_format(sp) == "sparsify"
    with pytest.raises(FormatError, match="several sparsify SAEs"):
        open_dictionary(sp)
    one = open_dictionary(sp, hook="layers.3")
    assert one.cfg.hook == "blocks.3.resid_post" and open_dictionary(sp / "layers.4").cfg.hook == "blocks.4.resid_post"
    with torch.no_grad():
        assert torch.equal(one.encode(x), load_sparsify(sp / "layers.3").encode(x))
    tc = open_dictionary(INTEROP / "sparsify/transcoder/layers.3.mlp")
    assert (tc.cfg.hook, tc.cfg.hook_out) == ("blocks.3.mlp_in", "blocks.3.mlp_out")
    topk = build(DictConfig(arch="topk", d_in=8, d_sae=16, k=2, hook="blocks.1.resid_post"))
    mine = save_dictionary(topk, tmp_path / "m")
    assert detect_format(mine) == "lmscope" and open_dictionary(mine).cfg.hook == "blocks.1.resid_post"


@pytest.mark.parametrize("name", ["params.npz", "params.safetensors"])
def test_a_gemma_scope_jumprelu_file_loads_exactly_and_needs_its_hook(tmp_path: Path, name: str) -> None:
    path, ref = _gemma(tmp_path, name)
    assert detect_format(path) == detect_format(tmp_path) == "gemmascope"
    with pytest.raises(FormatError, match="names no hook; pass its hook"):
        open_dictionary(path)
    d = open_dictionary(path, hook="blocks.12.hook_resid_post")
    assert d.arch == "jumprelu" and d.cfg.hook == "blocks.12.resid_post" and not d.cfg.apply_b_dec_to_input
    x = torch.randn(7, 8)
    with torch.no_grad():
        assert torch.allclose(d.encode(x), ref.encode(x))
        assert torch.allclose(d.decode(d.encode(x)), ref.decode(ref.encode(x)))
        pre = x @ ref.W_enc + ref.b_enc
        assert torch.equal(d.encode(x) > 0, pre > ref.threshold)


def test_bad_files_are_refused_naming_what_was_seen(tmp_path: Path) -> None:
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "weights.bin").write_bytes(b"x")
    with pytest.raises(FormatError, match=r"no dictionary lmscope recognises: it holds weights\.bin"):
        open_dictionary(tmp_path / "junk")
    with pytest.raises(FormatError, match="does not exist"):
        open_dictionary(tmp_path / "missing")
    np.savez(tmp_path / "obj.npz", W_enc=np.array([{"a": 1}], dtype=object))
    with pytest.raises(FormatError, match=r"not a readable \.npz"):
        open_dictionary(tmp_path / "obj.npz", hook="blocks.0.resid_post")
    np.savez(tmp_path / "partial.npz", W_enc=np.zeros((4, 6), np.float32))
    with pytest.raises(FormatError, match="missing"):
        open_dictionary(tmp_path / "partial.npz", hook="blocks.0.resid_post")
    bad = tmp_path / "normalized"
    bad.mkdir()
    for f in ("cfg.json", "sae_weights.safetensors"):
        (bad / f).write_bytes((INTEROP / "saelens6/topk" / f).read_bytes())
    cfg = json.loads((bad / "cfg.json").read_text())
    cfg["metadata"]["hook_name"] = "blocks.3.ln2.hook_normalized"
    (bad / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(FormatError, match="before its gain"):
        open_dictionary(bad)


def test_convert_round_trips_exactly(tmp_path: Path) -> None:
    src = build(DictConfig(arch="jumprelu", d_in=8, d_sae=16, hook="blocks.1.resid_post", model="tiny"), seed=1)
    with torch.no_grad():
        src.threshold.copy_(torch.rand(16) * 0.1)
    a = save_dictionary(src, tmp_path / "a")
    sl = convert_dictionary(a, "saelens", tmp_path / "sl")
    assert json.loads((sl / "cfg.json").read_text())["metadata"]["hook_name"] == "blocks.1.hook_resid_post"
    b = convert_dictionary(sl, "lmscope", tmp_path / "b")
    ta, tb = load_file(str(a / "dictionary.safetensors")), load_file(str(b / "dictionary.safetensors"))
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    ca, cb = (json.loads((p / "config.json").read_text())["config"] for p in (a, b))
    assert ca == cb
    # and from SAELens's own file: lmscope and back to SAELens keeps SAELens's weights
    back = convert_dictionary(convert_dictionary(INTEROP / "saelens6/topk", "lmscope", tmp_path / "c"), "saelens",
                              tmp_path / "d")  # fmt: skip
    t0 = load_file(str(INTEROP / "saelens6/topk/sae_weights.safetensors"))
    t1 = load_file(str(back / "sae_weights.safetensors"))
    assert t0.keys() == t1.keys() and all(torch.equal(t0[k], t1[k]) for k in t0)
    assert json.loads((back / "cfg.json").read_text())["metadata"]["hook_name"] == "blocks.3.hook_resid_pre"
    with pytest.raises(FormatError, match="not empty"):
        convert_dictionary(a, "saelens", tmp_path / "sl")
    with pytest.raises(FormatError, match="choose lmscope or saelens"):
        convert_dictionary(a, "sparsify", tmp_path / "e")


# ------------------------------------------------------------------------------------------------ from the CLI
def _saelens_layout(path: Path, arch: str, d: torch.nn.Module, hook: str) -> Path:
    """Write a dictionary the way SAELens 6 saves an inference SAE: cfg.json (its v6 keys) and
    sae_weights.safetensors (W_enc [d_in, d_sae], W_dec [d_sae, d_in], b_enc, b_dec, + threshold for jumprelu)."""
    path.mkdir(parents=True)
    cfg = {"d_in": d.cfg.d_in, "d_sae": d.cfg.d_sae, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none",
           "metadata": {"sae_lens_version": "6.54.12", "sae_lens_training_version": "6.54.12", "hook_name": hook,
                        "model_name": "tiny-llama"},
           "architecture": arch}  # fmt: skip
    names = ["W_enc", "W_dec", "b_enc", "b_dec"]
    if arch == "topk":
        cfg |= {"k": d.cfg.k, "rescale_acts_by_decoder_norm": False}
    else:
        names.append("threshold")
    (path / "cfg.json").write_text(json.dumps(cfg))
    sd = d.state_dict()
    save_file({k: sd[k].detach().contiguous() for k in names}, str(path / "sae_weights.safetensors"))
    return path


@pytest.mark.parametrize("arch", ["topk", "jumprelu"])
def test_saelens_files_for_transformerlens_hooks_run_through_eval_and_atlas(arch: str, tmp_path: Path) -> None:
    from atlas_helpers import make_corpus
    from lmscope.cli.app import app
    from tiny_models import save_tiny_with_tokenizer

    model = save_tiny_with_tokenizer("llama", str(tmp_path / "model"))
    corpus = make_corpus(tmp_path / "corpus", n_docs=12)
    d = build(DictConfig(arch=arch, d_in=32, d_sae=48, k=4), seed=0)
    if arch == "jumprelu":
        with torch.no_grad():
            d.threshold.fill_(0.02)
    sae = _saelens_layout(tmp_path / "sae", arch, d, "blocks.1.hook_resid_post")
    r = runner.invoke(app, ["eval", model, "--dict", str(sae), "--corpus", str(corpus), "--tokens", "256",
                            "--context", "32", "--json", str(tmp_path / "eval.json"), "--device", "cpu"])  # fmt: skip
    assert r.exit_code == 0, r.output
    ev = json.loads((tmp_path / "eval.json").read_text())
    assert ev["tokens"] > 0 and np.isfinite(ev["fvu"])
    r = runner.invoke(app, ["atlas", model, "--dict", str(sae), "--corpus", str(corpus), "--tokens", "512",
                            "--context", "32", "--out", str(tmp_path / "a.db"), "--device", "cpu",
                            "--no-progress"])  # fmt: skip
    assert r.exit_code == 0, r.output
    from lmscope.atlas import open_atlas
    from lmscope.atlas.db.schema import get_meta

    prov = get_meta(open_atlas(tmp_path / "a.db"), "provenance")
    assert prov["hook"] == "blocks.1.resid_post"
    assert prov["dictionary"]["training"]["hook_as_saved"] == "blocks.1.hook_resid_post"
    bad = _saelens_layout(tmp_path / "bad", arch, d, "blocks.1.ln2.hook_normalized")
    r = runner.invoke(app, ["eval", model, "--dict", str(bad), "--corpus", str(corpus), "--tokens", "64",
                            "--device", "cpu"])  # fmt: skip
    assert r.exit_code != 0 and "before its gain" in r.output
    r = runner.invoke(app, ["convert", str(sae), "--to", "lmscope", "--out", str(tmp_path / "conv")])
    assert r.exit_code == 0, r.output
    assert "blocks.1.resid_post" in r.output
