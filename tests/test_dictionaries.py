"""The dictionary interface, the registry, the sparse decoder and the checked file formats."""

from __future__ import annotations

import importlib
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lmscope.core import native
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

ARCHS = ["relu", "topk", "batchtopk", "jumprelu", "matryoshka"]


def make(arch: str, d_in: int = 16, d_sae: int = 64, d_out: int | None = None, seed: int = 0) -> Dictionary:
    d = build(DictConfig(arch=arch, d_in=d_in, d_sae=d_sae, d_out=d_out, k=4), seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():  # non-trivial biases and thresholds, so round trips test every tensor
        d.b_enc.copy_(torch.randn(d_sae, generator=g) * 0.1)
        d.b_dec.copy_(torch.randn(d.b_dec.shape[0], generator=g))
        if arch == "jumprelu":
            d.threshold.copy_(torch.rand(d_sae, generator=g) * 0.3)
        if arch in ("batchtopk", "matryoshka"):
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


def test_matryoshka_prefixes_each_reconstruct_from_their_own_latents() -> None:
    cfg = DictConfig(arch="matryoshka", d_in=16, d_sae=64, k=4)
    assert build(cfg).prefixes == [4, 8, 16, 32, 64]  # the default groups 1/16, 1/16, 1/8, 1/4, 1/2
    assert build(DictConfig(arch="matryoshka", d_in=16, d_sae=64, k=4, matryoshka_groups=[16, 48])).prefixes == [16, 64]
    assert build(DictConfig(arch="matryoshka", d_in=4, d_sae=8, k=2)).prefixes == [1, 2, 4, 8]  # 1/16 of 8 is no latent
    d = make("matryoshka")
    x = torch.randn(32, 16)
    out = d.training_loss(x, x, LossState())
    with torch.no_grad():  # the same selection, decoded prefix by prefix by hand
        z = d.batch_select(d.pre_acts(x))
        inner = sum(float(d.mse(x, z[:, :m] @ d.W_dec[:m] + d.b_dec)) for m in d.prefixes[:-1])
        full = float(d.mse(x, z @ d.W_dec + d.b_dec))
    assert float(out.terms["prefix_mse"]) == pytest.approx(inner, rel=1e-5)
    assert float(out.terms["mse"]) == pytest.approx(full, rel=1e-5)
    assert float(out.loss.detach()) == pytest.approx(inner + full, rel=1e-5)  # no dead latents: no AuxK
    bad = [
        ([0.5, 0.25], "sums to 0.75; give fractions of d_sae summing to 1 or latent counts summing to d_sae=8"),
        ([1 / 16, 15 / 16], "leaves a group with no latent at d_sae=8"),
        ([-1, 9], "every group size must be positive"),
        ([3, 4], "sums to 7"),
    ]
    for groups, message in bad:
        with pytest.raises(DictionaryError, match=re.escape(message)):
            DictConfig(arch="matryoshka", d_in=4, d_sae=8, k=4, matryoshka_groups=groups)
    with pytest.raises(DictionaryError, match="k=9 exceeds d_sae=8"):
        DictConfig(arch="matryoshka", d_in=4, d_sae=8, k=9, matryoshka_groups=[0.5, 0.5])


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
@pytest.mark.parametrize("m", [64, 600])  # 600: latents unused by any token, and several blocks of the transpose
@pytest.mark.parametrize("product", ["csr", "coo"])  # coo: the path off a CPU, forced here
def test_fused_topk_matches_the_dense_reference(
    center: bool, m: int, product: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Forward and every gradient of the fused sparse TopK step equal plain autograd on dense latents (float64)."""
    if product == "coo":
        module = importlib.import_module("lmscope.dictionaries.sparse_decode")  # (the package re-exports a function)
        monkeypatch.setattr(module, "_ByLatent", lambda idx, m: None)
    g = torch.Generator().manual_seed(0)
    n, d, k = 300, 16, 5
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


@pytest.mark.parametrize("shape", ["autoencoder", "transcoder"])
@pytest.mark.parametrize("native_on", ["1", "0"], ids=["c backward", "torch backward"])
@pytest.mark.parametrize("frozen", [None, "w_dec", "w_enc"])
def test_fused_topk_in_float32_matches_the_reference(
    shape: str, native_on: str, frozen: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """float32 on a CPU takes core/native.py's one-pass backward (value, decoder, encoder and bias gradients) where it
    is built; it equals the float64 reference on the same selected latents, with a decoder or an encoder frozen too."""
    monkeypatch.setenv("LMSCOPE_NATIVE", native_on)
    module = importlib.import_module("lmscope.dictionaries.sparse_decode")
    taken: list[bool] = []
    real = module._fused_backward

    def recording(*args: object) -> object:
        out = real(*args)
        taken.append(out is not None)
        return out

    monkeypatch.setattr(module, "_fused_backward", recording)
    g = torch.Generator().manual_seed(1)
    n, m, k = 257, 600, 7
    d_in, d_out = (48, 48) if shape == "autoencoder" else (40, 56)
    center = shape == "autoencoder"
    x = torch.randn(n, d_in, generator=g).requires_grad_()
    params = [
        torch.randn(d_in, m, generator=g) / 6,
        torch.randn(m, generator=g) * 0.3,
        torch.randn(m, d_out, generator=g),
        torch.randn(d_out, generator=g),
    ]
    names = ["w_enc", "b_enc", "w_dec", "b_dec"]
    params = [p.requires_grad_(name != frozen) for p, name in zip(params, names, strict=True)]
    w_enc, b_enc, w_dec, b_dec = params
    with torch.no_grad():
        params[2][:3] = 0.0  # zero decoder rows and b_dec a width apart from the input's are fine
    upstream = torch.randn(n, d_out, generator=g)
    b_in = b_dec if center else torch.zeros(d_in)
    recon, vals, idx = fused_topk(x, w_enc, b_enc, w_dec, b_dec, k, center)
    wanted = [x, *(p for p in params if p.requires_grad)]
    fused_grads = torch.autograd.grad((recon * upstream).sum(), wanted)
    w64 = [t.detach().double().requires_grad_(t.requires_grad) for t in (x, *params)]
    x64, we64, be64, wd64, bd64 = w64
    pre = (x64 - (bd64 if center else b_in.double())) @ we64 + be64
    z = torch.zeros_like(pre).scatter(1, idx, torch.relu(pre.gather(1, idx)))  # the latents the fused step chose
    ref = z @ wd64 + bd64
    ref_grads = torch.autograd.grad((ref * upstream.double()).sum(), [t for t in w64 if t.requires_grad])
    torch.testing.assert_close(recon.double(), ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(vals.double(), torch.relu(pre.gather(1, idx)), rtol=1e-4, atol=1e-4)
    chosen = torch.zeros_like(pre, dtype=torch.bool).scatter(1, idx, True)
    assert bool((pre.masked_fill(chosen, -1e30).amax(1) <= pre.gather(1, idx).amin(1) + 1e-4).all())  # a top k
    assert taken == ([True] if native_on == "1" and native.library() is not None else [False])
    for a, b in zip(fused_grads, ref_grads, strict=True):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4)


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
    assert back.cfg == d.cfg
    with torch.no_grad():
        assert torch.equal(back.encode(x), d.encode(x))
        z = d.encode(x)
        assert torch.equal(back.decode(z), d.decode(z))
    cfg = json.loads((tmp_path / "sl" / "cfg.json").read_text())
    assert cfg["architecture"] == {"relu": "standard", "batchtopk": "jumprelu", "matryoshka": "jumprelu"}.get(
        arch, arch
    )


# ---------------------------------------------------------------------- files written by the real libraries
# tests/fixtures/interop holds files saved by real SAELens 6.54.12 / 5.11.0 and eai-sparsify 1.3.3 (their own save
# APIs) with the outputs those libraries computed: benchmarks/anchors/make_interop_fixtures.py made them, and its
# docstring says how to remake them. No test here needs either library.
INTEROP = Path(__file__).resolve().parent / "fixtures" / "interop"
VERSIONS = {
    "saelens6": ("sae-lens", "6.54.12"),
    "saelens5": ("sae-lens", "5.11.0"),
    "sparsify": ("eai-sparsify", "1.3.3"),
}
HOOK, HOOK_OUT = "blocks.3.hook_resid_pre", "blocks.3.hook_mlp_out"

# fixture -> (the lmscope architecture it loads as, d_out, the settings folded into its weights)
SAELENS_LOADS = {
    "saelens6/standard": ("relu", 8, None),
    "saelens6/topk": ("topk", 8, None),
    "saelens6/jumprelu": ("jumprelu", 8, None),
    "saelens6/jumprelu_negative_thresholds": ("jumprelu", 8, None),
    "saelens6/transcoder": ("relu", 12, None),
    "saelens6/jumprelu_transcoder": ("jumprelu", 12, None),
    "saelens6/topk_trained": ("topk", 8, ["rescale_acts_by_decoder_norm"]),
    "saelens6/topk_checkpoint": ("topk", 8, ["rescale_acts_by_decoder_norm"]),
    "saelens6/batchtopk_trained": ("jumprelu", 8, None),  # SAELens saves a trained BatchTopK SAE as JumpReLU
    "saelens6/batchtopk_checkpoint": ("batchtopk", 8, ["rescale_acts_by_decoder_norm"]),
    "saelens5/standard": ("relu", 8, None),
    "saelens5/topk": ("topk", 8, None),
    "saelens5/standard_topk": ("topk", 8, None),
    "saelens5/jumprelu": ("jumprelu", 8, None),
    "saelens5/finetuning_scaling_factor": ("relu", 8, ["finetuning_scaling_factor"]),
}
# fixture -> what the refusal must name
SAELENS_REFUSES = {
    "saelens6/gated": r"architecture 'gated': gated SAEs .* not supported",
    "saelens5/gated": r"architecture 'gated': gated SAEs .* not supported",
    "saelens6/skip_transcoder": r"'skip_transcoder' has a skip connection \(W_skip\)",
    "saelens6/normalize_expected_average": r"normalize_activations='expected_average_only_in' .*"
    r"fold_activation_norm_scaling_factor",
    "saelens6/normalize_layer_norm": r"normalize_activations='layer_norm' is not supported: it layer-normalises",
    "saelens6/hook_z": r"reshape_activations='hook_z' is not supported",
    "saelens5/tanh_relu": r"activation function 'tanh-relu' for architecture 'standard' is not supported",
}
LMSCOPE_EXPORTS = {  # lmscope_export/<name> -> (lmscope arch, SAELens class name SAELens loaded it as, d_out)
    "relu": ("relu", "standard", 8),
    "topk": ("topk", "topk", 8),
    "batchtopk": ("batchtopk", "jumprelu", 8),
    "jumprelu": ("jumprelu", "jumprelu", 8),
    "relu_transcoder": ("relu", "transcoder", 12),
    "jumprelu_transcoder": ("jumprelu", "jumprelu_transcoder", 12),
    "batchtopk_transcoder": ("batchtopk", "jumprelu_transcoder", 12),
}


def _expected(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "expected.safetensors"))


def _library(path: Path) -> dict:
    return json.loads((path / "library.json").read_text())


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def _matches_library(d: Dictionary, e: dict[str, torch.Tensor]) -> None:
    """lmscope's encode / decode / forward equal what the real library computed on the same inputs."""
    with torch.no_grad():
        z = d.encode(e["x"])
        _close(z, e["encode"])
        assert torch.equal(z != 0, e["encode"] != 0)  # the same latents fire
        _close(d.decode(e["encode"]), e["decode"])
        recon, latents = d(e["x"])
        _close(recon, e["forward"])
        _close(latents, e["encode"])
    assert int((e["encode"] != 0).sum()) > 0 and bool((e["encode"] == 0).any())  # a non-trivial case


def test_interop_fixtures_are_what_the_real_libraries_wrote() -> None:
    """Every fixture is listed below, each says which library and version wrote it, and together they stay small."""
    dirs = {p.parent for p in INTEROP.rglob("library.json")}
    listed = {INTEROP / name for name in [*SAELENS_LOADS, *SAELENS_REFUSES]}
    listed |= {INTEROP / "lmscope_export" / name for name in LMSCOPE_EXPORTS}
    assert {d for d in dirs if not d.is_relative_to(INTEROP / "sparsify")} == listed
    for d in dirs:
        lib = _library(d)
        family = d.relative_to(INTEROP).parts[0]
        want = VERSIONS.get(family, VERSIONS["saelens6"])
        assert (lib["library"], lib["version"]) == want, d
    assert sum(p.stat().st_size for p in INTEROP.rglob("*") if p.is_file()) < 400_000


@pytest.mark.parametrize("name", sorted(SAELENS_LOADS))
def test_saelens_files_compute_what_saelens_computed(name: str) -> None:
    path = INTEROP / name
    arch, d_out, folded = SAELENS_LOADS[name]
    d = load_saelens(path)
    assert (d.arch, d.cfg.d_in, d.cfg.d_sae, d.cfg.d_out) == (arch, 8, 24, d_out)
    assert d.cfg.hook == HOOK and d.cfg.model == "gpt2"
    assert d.cfg.hook_out == (HOOK_OUT if d_out != 8 else None)
    assert d.cfg.is_transcoder == (d_out != 8)
    if arch == "topk":
        assert d.cfg.k == 3
    assert d.metadata["training"].get("folded") == folded
    _matches_library(d, _expected(path))


def test_what_the_real_saelens_files_revealed() -> None:
    """The SAELens layouts the interop code must handle, as the real library writes them."""
    raw = {n: json.loads((INTEROP / n / "cfg.json").read_text()) for n in SAELENS_LOADS}
    # a SAELens 6 training run ends with save_inference_model: decoder norms folded, but the flag still set
    assert raw["saelens6/topk_trained"]["rescale_acts_by_decoder_norm"] is True
    trained = load_file(str(INTEROP / "saelens6/topk_trained/sae_weights.safetensors"))
    torch.testing.assert_close(trained["W_dec"].norm(dim=1), torch.ones(24))
    checkpoint = load_file(str(INTEROP / "saelens6/topk_checkpoint/sae_weights.safetensors"))
    assert (checkpoint["W_dec"].norm(dim=1) - 1).abs().max() > 0.1  # a checkpoint is not folded: lmscope folds it
    torch.testing.assert_close(load_saelens(INTEROP / "saelens6/topk_checkpoint").W_dec.norm(dim=1), torch.ones(24))
    # BatchTopK: a checkpoint holds a scalar topk_threshold; the trained file is a JumpReLU SAE with equal thresholds
    assert raw["saelens6/batchtopk_checkpoint"]["architecture"] == "batchtopk"
    assert load_file(str(INTEROP / "saelens6/batchtopk_checkpoint/sae_weights.safetensors"))["topk_threshold"].ndim == 0
    assert raw["saelens6/batchtopk_trained"]["architecture"] == "jumprelu"
    theta = load_file(str(INTEROP / "saelens6/batchtopk_trained/sae_weights.safetensors"))["threshold"]
    assert bool((theta == theta[0]).all())
    assert float(load_saelens(INTEROP / "saelens6/batchtopk_checkpoint").threshold) == pytest.approx(0.25)
    # SAELens 5: TopK as architecture topk or standard + activation_fn_str, k in activation_fn_kwargs, top-level hook
    for name in ("saelens5/topk", "saelens5/standard_topk"):
        assert raw[name]["activation_fn_str"] == "topk" and raw[name]["activation_fn_kwargs"] == {"k": 3}
        assert "k" not in raw[name] and "metadata" not in raw[name] and raw[name]["hook_name"] == HOOK
    assert raw["saelens5/standard_topk"]["architecture"] == "standard"
    # JumpReLU: SAELens computes relu(pre) * (pre > threshold), so a negative threshold loads as 0
    negative = load_file(str(INTEROP / "saelens6/jumprelu_negative_thresholds/sae_weights.safetensors"))["threshold"]
    assert bool((negative < 0).any())
    loaded = load_saelens(INTEROP / "saelens6/jumprelu_negative_thresholds").threshold
    assert torch.equal(loaded, negative.clamp_min(0))


@pytest.mark.parametrize("name", sorted(SAELENS_REFUSES))
def test_saelens_settings_lmscope_cannot_compute_are_refused_by_name(name: str) -> None:
    with pytest.raises(FormatError, match=SAELENS_REFUSES[name]):
        load_saelens(INTEROP / name)


def _copy(name: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(INTEROP / name, tmp_path / name.replace("/", "-")))


def test_saelens_conversions_are_never_silent(tmp_path: Path) -> None:
    """Edited copies of real files: each damage is an error that says what is wrong."""
    nothr = _copy("saelens6/jumprelu", tmp_path)
    t = load_file(str(nothr / "sae_weights.safetensors"))
    save_file({k: v for k, v in t.items() if k != "threshold"}, str(nothr / "sae_weights.safetensors"))
    with pytest.raises(FormatError, match="missing tensors \\['threshold'\\]"):
        load_saelens(nothr)
    btk = _copy("saelens6/batchtopk_checkpoint", tmp_path)
    cfg = json.loads((btk / "cfg.json").read_text())
    (btk / "cfg.json").write_text(json.dumps({**cfg, "k": 2.5}))  # SAELens's BatchTopK k is a float
    with pytest.raises(FormatError, match=r"k=2\.5 is not a whole number"):
        load_saelens(btk)
    (btk / "cfg.json").write_text(json.dumps(cfg))
    t = load_file(str(btk / "sae_weights.safetensors"))
    save_file({k: v for k, v in t.items() if k != "topk_threshold"}, str(btk / "sae_weights.safetensors"))
    with pytest.raises(FormatError, match="without its inference threshold"):
        load_saelens(btk)
    shape = _copy("saelens6/standard", tmp_path)
    cfg = json.loads((shape / "cfg.json").read_text())
    (shape / "cfg.json").write_text(json.dumps({**cfg, "d_sae": 25}))
    with pytest.raises(FormatError, match="W_enc has shape \\[8, 24\\], expected \\[8, 25\\]"):
        load_saelens(shape)
    (shape / "cfg.json").write_text(json.dumps({**cfg, "architecture": "matryoshka_batchtopk"}))
    with pytest.raises(FormatError, match="SAELens architecture 'matryoshka_batchtopk' is not supported"):
        load_saelens(shape)
    v5 = _copy("saelens5/standard", tmp_path)
    cfg = json.loads((v5 / "cfg.json").read_text())
    (v5 / "cfg.json").write_text(json.dumps({**cfg, "normalize_activations": True}))  # v5 wrote booleans too
    with pytest.raises(FormatError, match="normalize_activations='expected_average_only_in'"):
        load_saelens(v5)
    (v5 / "cfg.json").write_text(json.dumps({**cfg, "hook_name": "blocks.3.attn.hook_z"}))  # v5: hook_z by name
    with pytest.raises(FormatError, match="reshape_activations='hook_z'"):
        load_saelens(v5)
    fsf = _copy("saelens5/finetuning_scaling_factor", tmp_path)
    cfg = json.loads((fsf / "cfg.json").read_text())
    (fsf / "cfg.json").write_text(json.dumps({**cfg, "finetuning_scaling_factor": False}))
    with pytest.raises(FormatError, match="unexpected tensors \\['finetuning_scaling_factor'\\]"):
        load_saelens(fsf)
    unestimated = build(DictConfig(arch="batchtopk", d_in=8, d_sae=16, k=2))
    with pytest.raises(FormatError, match="no threshold yet"):
        export_saelens(unestimated, tmp_path / "out")
    with pytest.raises(FormatError, match="SAELens dictionary; load it with"):
        load_dictionary(INTEROP / "saelens6/standard")


def test_saelens_v5_scaling_factor_under_the_name_its_loader_reads(tmp_path: Path) -> None:
    """SAELens 5's loader reads the factor as `scaling_factor` (and drops one of all ones); lmscope does the same."""
    path = _copy("saelens5/finetuning_scaling_factor", tmp_path)
    t = load_file(str(path / "sae_weights.safetensors"))
    t["scaling_factor"] = t.pop("finetuning_scaling_factor")
    save_file(t, str(path / "sae_weights.safetensors"))
    _matches_library(load_saelens(path), _expected(path))
    cfg = json.loads((path / "cfg.json").read_text())
    (path / "cfg.json").write_text(json.dumps({**cfg, "finetuning_scaling_factor": False}))
    with pytest.raises(FormatError, match="scaling_factor but finetuning_scaling_factor is not set"):
        load_saelens(path)
    t["scaling_factor"] = torch.ones(24)
    save_file(t, str(path / "sae_weights.safetensors"))
    assert load_saelens(path).metadata["training"].get("folded") is None


@pytest.mark.parametrize("name", sorted(LMSCOPE_EXPORTS))
def test_lmscope_exports_load_in_real_saelens(name: str, tmp_path: Path) -> None:
    """lmscope_export/ holds lmscope's export_saelens files; real SAELens 6 loaded them and computed `expected`.

    lmscope must compute the same, SAELens must have read the hook names, and today's exporter must still write
    exactly these files (otherwise re-run the fixture script so real SAELens checks the new ones).
    """
    path = INTEROP / "lmscope_export" / name
    arch, saelens_class, d_out = LMSCOPE_EXPORTS[name]
    seen = _library(path)["saelens_reads"]
    assert seen["architecture"] == saelens_class and seen["hook_name"] == HOOK and seen["model_name"] == "gpt2"
    assert seen["hook_name_out"] == (HOOK_OUT if d_out != 8 else None)
    d = load_saelens(path)
    assert (d.arch, d.cfg.d_out, d.cfg.hook, d.cfg.hook_out) == (arch, d_out, HOOK, seen["hook_name_out"])
    _matches_library(d, _expected(path))
    export_saelens(d, tmp_path / "again")
    assert (tmp_path / "again" / "cfg.json").read_text() == (path / "cfg.json").read_text()
    again = load_file(str(tmp_path / "again" / "sae_weights.safetensors"))
    committed = load_file(str(path / "sae_weights.safetensors"))
    assert again.keys() == committed.keys()
    assert all(torch.equal(again[k], committed[k]) for k in committed)


def test_a_topk_transcoder_has_no_saelens_export(tmp_path: Path) -> None:
    d = make("topk", d_in=16, d_out=12)
    with pytest.raises(FormatError, match="TopK transcoder \\(16 -> 12\\) has no SAELens counterpart"):
        export_saelens(d, tmp_path / "tc")
    assert not (tmp_path / "tc").exists()


# ---------------------------------------------------------------------- sparsify
def test_sparsify_checkpoint_computes_what_sparsify_computed(tmp_path: Path) -> None:
    root = INTEROP / "sparsify" / "sae"
    with pytest.raises(FormatError, match=r"pass hook= one of layers\.3, layers\.4"):
        load_sparsify(root)
    with pytest.raises(FormatError, match=r"no SAE for hook 'layers\.9'; it has layers\.3, layers\.4"):
        load_sparsify(root, hook="layers.9")
    for hook in ("layers.3", "layers.4"):
        cfg = json.loads((root / hook / "cfg.json").read_text())
        assert cfg["num_latents"] == 0 and cfg["expansion_factor"] == 3  # the width comes from the weights
        d = load_sparsify(root, hook=hook)
        assert (d.arch, d.cfg.k, d.cfg.d_in, d.cfg.d_sae, d.cfg.hook) == ("topk", 4, 8, 24, hook)
        assert d.cfg.apply_b_dec_to_input and not d.cfg.is_transcoder
        e = _expected(root / hook)
        _matches_library(d, e)
        with torch.no_grad():
            vals, idx = d.encode_sparse(e["x"])  # the compact form: sparsify's (top_acts, top_indices), as sets
        order, want = idx.sort(-1), e["top_indices"].long().sort(-1)
        assert torch.equal(order.values, want.values)
        _close(vals.gather(-1, order.indices), e["top_acts"].gather(-1, want.indices))
    with pytest.raises(FormatError, match="sparsify dictionary; load it with"):
        load_dictionary(root)


def test_sparsify_transcoder_does_not_subtract_b_dec() -> None:
    """A real sparsify transcoder (transcode=True): its encoder sees the raw input, not x - b_dec."""
    path = INTEROP / "sparsify" / "transcoder" / "layers.3.mlp"
    assert json.loads((path / "cfg.json").read_text())["transcode"] is True
    d = load_sparsify(path)
    assert d.cfg.is_transcoder and not d.cfg.apply_b_dec_to_input and d.cfg.d_out == 8
    assert d.cfg.hook == "layers.3.mlp"
    e = _expected(path)
    _matches_library(d, e)
    with torch.no_grad():  # the two readings of the file give different latents: the check above can tell them apart
        d.cfg.apply_b_dec_to_input = True
        assert not torch.allclose(d.encode(e["x"]), e["encode"], atol=1e-3)


def test_sparsify_settings_lmscope_cannot_compute_are_refused() -> None:
    with pytest.raises(FormatError, match="skip connections \\(W_skip\\)"):
        load_sparsify(INTEROP / "sparsify" / "skip" / "layers.3.mlp")
    with pytest.raises(FormatError, match="sparsify activation 'groupmax' is not supported"):
        load_sparsify(INTEROP / "sparsify" / "groupmax", hook="layers.3")


# ---------------------------------------------------------------------- transcoders
@pytest.mark.parametrize("arch", ["relu", "jumprelu", "batchtopk", "matryoshka"])
def test_transcoder_shapes_and_round_trip(arch: str, tmp_path: Path) -> None:
    d = make(arch, d_in=16, d_out=12)
    d.cfg.hook_out = "blocks.0.hook_mlp_out"
    assert not d.cfg.apply_b_dec_to_input and d.cfg.is_transcoder
    recon, _ = d(torch.randn(3, 16))
    assert recon.shape == (3, 12)
    export_saelens(d, tmp_path / "tc")
    cfg = json.loads((tmp_path / "tc" / "cfg.json").read_text())
    assert cfg["architecture"] == {"relu": "transcoder"}.get(arch, "jumprelu_transcoder") and cfg["d_out"] == 12
    back = load_saelens(tmp_path / "tc")
    assert back.arch == arch and back.cfg.hook_out == "blocks.0.hook_mlp_out"
    x = torch.randn(9, 16)
    with torch.no_grad():
        assert torch.equal(back(x)[0], d(x)[0])
