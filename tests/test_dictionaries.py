"""The dictionary interface, the registry, the sparse decoder and the checked file formats."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lmscope.dictionaries import DictConfig, Dictionary, DictionaryError, LossState, architectures, build
from lmscope.dictionaries.formats import (
    FormatError,
    export_saelens,
    load_dictionary,
    load_saelens,
    load_sparsify,
    save_dictionary,
)
from lmscope.dictionaries.sparse_decode import dense_decode, fused_topk, sparse_decode

ARCHS = ["relu", "topk", "batchtopk", "jumprelu"]


def make(arch: str, d_in: int = 16, d_sae: int = 64, d_out: int | None = None, seed: int = 0) -> Dictionary:
    d = build(DictConfig(arch=arch, d_in=d_in, d_sae=d_sae, d_out=d_out, k=4), seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():  # non-trivial biases and thresholds, so round trips test every tensor
        d.b_enc.copy_(torch.randn(d_sae, generator=g) * 0.1)
        d.b_dec.copy_(torch.randn(d.b_dec.shape[0], generator=g))
        if arch == "jumprelu":
            d.threshold.copy_(torch.rand(d_sae, generator=g) * 0.3)
        if arch == "batchtopk":
            d.threshold.fill_(0.25)
    return d.eval()


def test_registry_lists_every_architecture() -> None:
    assert set(ARCHS) <= set(architectures())
    with pytest.raises(DictionaryError, match="unknown dictionary architecture 'gated'"):
        DictConfig(arch="gated", d_in=4, d_sae=8)
    with pytest.raises(DictionaryError, match="k=9 exceeds d_sae=8"):
        DictConfig(arch="topk", d_in=4, d_sae=8, k=9)


@pytest.mark.parametrize("arch", ARCHS)
def test_interface_shapes_and_training_loss(arch: str) -> None:
    d = make(arch)
    x = torch.randn(2, 5, 16)
    recon, z = d(x)
    assert recon.shape == (2, 5, 16) and z.shape == (2, 5, 64)
    assert torch.allclose(d.decode(d.encode(x)), recon, atol=1e-5)
    assert d.decoder_directions.shape == (64, 16)
    assert (z >= 0).all()
    if arch == "topk":
        assert ((z > 0).sum(-1) <= 4).all()
    out = d.training_loss(x.reshape(-1, 16), x.reshape(-1, 16), LossState(progress=0.5))
    out.loss.backward()
    assert out.fired.shape == (64,) and out.recon.shape == (10, 16)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in d.parameters())


def test_init_decoder_is_encoder_transpose_with_unit_rows() -> None:
    d = build(DictConfig(arch="topk", d_in=16, d_sae=64, k=4), seed=3)
    assert torch.allclose(d.W_dec.norm(dim=1), torch.ones(64), atol=1e-5)
    assert torch.equal(d.W_enc, d.W_dec.T)
    assert torch.equal(build(d.cfg, seed=3).W_dec, d.W_dec)  # seeded init is deterministic


def test_unit_norm_constraint_and_parallel_gradient_removal() -> None:
    d = make("topk")
    x = torch.randn(32, 16)
    d.training_loss(x, x, LossState()).loss.backward()
    d.remove_parallel_grad()
    assert (d.W_dec.grad * d.W_dec).sum(1).abs().max() < 1e-4  # no component along the rows
    with torch.no_grad():
        d.W_dec.mul_(3.0)
    d.post_step()
    assert torch.allclose(d.W_dec.norm(dim=1), torch.ones(64), atol=1e-5)
    relu = make("relu")
    with torch.no_grad():
        relu.W_dec.mul_(3.0)
    relu.post_step()  # ReLU's decoder norm is free: its L1 is weighted by it instead
    assert relu.W_dec.norm(dim=1).min() > 0.2


def test_aux_k_loss_only_with_dead_latents() -> None:
    d = make("topk")
    x = torch.randn(32, 16)
    none_dead = d.training_loss(x, x, LossState(dead_mask=torch.zeros(64, dtype=torch.bool)))
    some_dead = d.training_loss(x, x, LossState(dead_mask=torch.arange(64) < 32))
    assert float(none_dead.terms["aux"]) == 0.0 and float(some_dead.terms["aux"]) > 0.0


def test_batchtopk_refuses_inference_without_threshold() -> None:
    d = build(DictConfig(arch="batchtopk", d_in=8, d_sae=32, k=2)).eval()
    with pytest.raises(DictionaryError, match="no inference threshold"):
        d.encode(torch.randn(3, 8))
    x = torch.randn(64, 8)
    d.training_loss(x, x, LossState())
    assert float(d.threshold) > 0  # estimated during training
    assert d.encode(x).shape == (64, 32)


def test_fold_scale_makes_raw_inputs_equivalent() -> None:
    for arch in ARCHS:
        d = make(arch)
        x = torch.randn(10, 16) * 7
        s = 0.37
        with torch.no_grad():
            recon_norm, z_norm = d(x * s)
        d.fold_scale(s, s)
        with torch.no_grad():
            recon_raw, z_raw = d(x)
        assert torch.allclose(z_raw, z_norm, atol=1e-4), arch
        assert torch.allclose(recon_raw * s, recon_norm, atol=1e-4), arch


# ---------------------------------------------------------------------- the sparse decoder
def test_sparse_decode_matches_dense_values_and_gradients() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(300, 24, generator=g)
    vals = torch.rand(2100, 7, generator=g)  # more than one backward chunk
    idx = torch.randint(0, 300, (2100, 7), generator=g)
    upstream = torch.randn(2100, 24, generator=g)
    results = []
    for fn in (sparse_decode, dense_decode):
        v, wt = vals.clone().requires_grad_(), w.clone().requires_grad_()
        out = fn(v, idx, wt)
        (out * upstream).sum().backward()
        results.append((out.detach(), v.grad, wt.grad))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("center", [True, False])
def test_fused_topk_matches_the_dense_reference(center: bool) -> None:
    """Forward and every gradient of the fused sparse TopK step equal plain autograd on dense latents (float64)."""
    g = torch.Generator().manual_seed(0)
    n, d, m, k = 300, 16, 64, 5
    x = torch.randn(n, d, generator=g, dtype=torch.float64).requires_grad_()
    params = [
        torch.randn(d, m, generator=g, dtype=torch.float64),
        torch.randn(m, generator=g, dtype=torch.float64) * 0.3,
        torch.randn(m, d, generator=g, dtype=torch.float64),
        torch.randn(d, generator=g, dtype=torch.float64),
    ]
    params = [p.requires_grad_() for p in params]
    w_enc, b_enc, w_dec, b_dec = params
    upstream = torch.randn(n, d, generator=g, dtype=torch.float64)
    recon, vals, idx = fused_topk(x, w_enc, b_enc, w_dec, b_dec, k, center)
    fused_grads = torch.autograd.grad((recon * upstream).sum(), [x, *params])
    pre = ((x - b_dec) if center else x) @ w_enc + b_enc
    top, top_idx = pre.topk(k)
    z = torch.zeros_like(pre).scatter(1, top_idx, torch.relu(top))
    ref = z @ w_dec + b_dec
    ref_grads = torch.autograd.grad((ref * upstream).sum(), [x, *params])
    torch.testing.assert_close(recon, ref)
    assert (vals >= 0).all()
    torch.testing.assert_close(torch.relu(pre).gather(1, idx), vals)
    for name, a, b in zip(["x", "W_enc", "b_enc", "W_dec", "b_dec"], fused_grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, msg=name)


# ---------------------------------------------------------------------- formats
@pytest.mark.parametrize("arch", ARCHS)
def test_lmscope_format_round_trip(arch: str, tmp_path: Path) -> None:
    d = make(arch)
    d.cfg.hook = "blocks.6.resid_post"
    save_dictionary(d, tmp_path / "dict", training={"tokens": 123})
    back = load_dictionary(tmp_path / "dict")
    assert back.arch == arch and back.cfg == d.cfg
    assert back.metadata["training"] == {"tokens": 123}
    for name, t in d.state_dict().items():
        assert torch.equal(t, back.state_dict()[name]), name
    assert not list((tmp_path / "dict").glob("*.tmp"))  # atomic writes leave no temporaries


@pytest.mark.parametrize("arch", ARCHS)
def test_lmscope_saelens_lmscope_preserves_outputs_exactly(arch: str, tmp_path: Path) -> None:
    d = make(arch)
    x = torch.randn(50, 16)
    export_saelens(d, tmp_path / "sl")
    back = load_saelens(tmp_path / "sl")
    assert back.arch == arch  # BatchTopK survives as BatchTopK, with its threshold
    with torch.no_grad():
        assert torch.equal(back.encode(x), d.encode(x))
        z = d.encode(x)
        assert torch.equal(back.decode(z), d.decode(z))
    cfg = json.loads((tmp_path / "sl" / "cfg.json").read_text())
    assert cfg["architecture"] == {"relu": "standard", "batchtopk": "jumprelu"}.get(arch, arch)


def _saelens_fixture(path: Path, arch: str, d_in: int = 8, d_sae: int = 20, with_threshold: bool = True) -> dict:
    """A SAELens directory written from the documented layout (not by lmscope's exporter)."""
    g = torch.Generator().manual_seed(5)
    t = {
        "W_enc": torch.randn(d_in, d_sae, generator=g),
        "W_dec": torch.randn(d_sae, d_in, generator=g),
        "b_enc": torch.randn(d_sae, generator=g),
        "b_dec": torch.randn(d_in, generator=g),
    }
    cfg = {
        "architecture": arch,
        "d_in": d_in,
        "d_sae": d_sae,
        "dtype": "float32",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "metadata": {"hook_name": "blocks.3.hook_resid_pre", "model_name": "gpt2"},
    }
    if arch == "jumprelu" and with_threshold:
        t["threshold"] = torch.rand(d_sae, generator=g)
    if arch == "topk":
        cfg["k"] = 3
    path.mkdir(parents=True)
    save_file(t, str(path / "sae_weights.safetensors"))
    (path / "cfg.json").write_text(json.dumps(cfg))
    return t


def test_saelens_fixture_loads_and_computes_the_documented_function(tmp_path: Path) -> None:
    t = _saelens_fixture(tmp_path / "jr", "jumprelu")
    d = load_saelens(tmp_path / "jr")
    assert d.arch == "jumprelu" and d.cfg.hook == "blocks.3.hook_resid_pre" and d.cfg.model == "gpt2"
    x = torch.randn(30, 8)
    pre = (x - t["b_dec"]) @ t["W_enc"] + t["b_enc"]
    expected = pre * (pre > t["threshold"])
    with torch.no_grad():
        torch.testing.assert_close(d.encode(x), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(d.decode(expected), expected @ t["W_dec"] + t["b_dec"], rtol=1e-5, atol=1e-5)
    t = _saelens_fixture(tmp_path / "tk", "topk")
    d = load_saelens(tmp_path / "tk")
    assert d.arch == "topk" and d.cfg.k == 3
    with torch.no_grad():
        assert int((d.encode(x) > 0).sum(-1).max()) <= 3


def test_saelens_conversions_are_never_silent(tmp_path: Path) -> None:
    _saelens_fixture(tmp_path / "nothr", "jumprelu", with_threshold=False)
    with pytest.raises(FormatError, match="missing tensors \\['threshold'\\]"):
        load_saelens(tmp_path / "nothr")
    _saelens_fixture(tmp_path / "btk", "batchtopk")
    with pytest.raises(FormatError, match="without its inference threshold"):
        load_saelens(tmp_path / "btk")
    _saelens_fixture(tmp_path / "norm", "standard")
    cfg = json.loads((tmp_path / "norm" / "cfg.json").read_text())
    (tmp_path / "norm" / "cfg.json").write_text(
        json.dumps({**cfg, "normalize_activations": "expected_average_only_in"})
    )
    with pytest.raises(FormatError, match="fold_activation_norm_scaling_factor"):
        load_saelens(tmp_path / "norm")
    _saelens_fixture(tmp_path / "shape", "standard")
    (tmp_path / "shape" / "cfg.json").write_text(json.dumps({**cfg, "d_sae": 21}))
    with pytest.raises(FormatError, match="W_enc has shape \\[8, 20\\], expected \\[8, 21\\]"):
        load_saelens(tmp_path / "shape")
    unestimated = build(DictConfig(arch="batchtopk", d_in=8, d_sae=16, k=2))
    with pytest.raises(FormatError, match="no threshold yet"):
        export_saelens(unestimated, tmp_path / "out")
    with pytest.raises(FormatError, match="SAELens dictionary; load it with"):
        load_dictionary(tmp_path / "nothr")


def _sparsify_fixture(root: Path, hook: str, transcode: bool = False) -> dict:
    g = torch.Generator().manual_seed(9)
    m, d = 24, 8
    t = {
        "encoder.weight": torch.randn(m, d, generator=g),
        "encoder.bias": torch.randn(m, generator=g),
        "W_dec": torch.randn(m, d, generator=g),
        "b_dec": torch.randn(d, generator=g),
    }
    (root / hook).mkdir(parents=True)
    save_file(t, str(root / hook / "sae.safetensors"))
    cfg = {
        "expansion_factor": 3,
        "normalize_decoder": True,
        "num_latents": m,
        "k": 4,
        "multi_topk": False,
        "skip_connection": False,
        "transcode": transcode,
        "d_in": d,
    }
    (root / hook / "cfg.json").write_text(json.dumps(cfg))
    return t


def test_sparsify_import(tmp_path: Path) -> None:
    t = _sparsify_fixture(tmp_path, "layers.6")
    _sparsify_fixture(tmp_path, "layers.7")
    with pytest.raises(FormatError, match=r"pass hook= one of layers\.6, layers\.7"):
        load_sparsify(tmp_path)
    d = load_sparsify(tmp_path, hook="layers.6")
    assert d.arch == "topk" and d.cfg.k == 4 and d.cfg.d_sae == 24 and d.cfg.hook == "layers.6"
    x = torch.randn(11, 8)
    pre = torch.relu((x - t["b_dec"]) @ t["encoder.weight"].T + t["encoder.bias"])
    vals, idx = pre.topk(4)
    expected = torch.zeros_like(pre).scatter(1, idx, vals) @ t["W_dec"] + t["b_dec"]
    with torch.no_grad():
        torch.testing.assert_close(d(x)[0], expected, rtol=1e-5, atol=1e-5)
    tc = load_sparsify(tmp_path / "layers.7")
    assert tc.cfg.apply_b_dec_to_input
    bad = tmp_path / "skip"
    _sparsify_fixture(bad, "h")
    cfg = json.loads((bad / "h" / "cfg.json").read_text())
    (bad / "h" / "cfg.json").write_text(json.dumps({**cfg, "skip_connection": True}))
    with pytest.raises(FormatError, match="skip connections"):
        load_sparsify(bad / "h")


def test_transcoder_shapes_and_round_trip(tmp_path: Path) -> None:
    d = make("topk", d_in=16, d_out=12)
    assert not d.cfg.apply_b_dec_to_input and d.cfg.is_transcoder
    recon, _ = d(torch.randn(3, 16))
    assert recon.shape == (3, 12)
    export_saelens(d, tmp_path / "tc")
    back = load_saelens(tmp_path / "tc")
    x = torch.randn(9, 16)
    with torch.no_grad():
        assert torch.equal(back(x)[0], d(x)[0])
