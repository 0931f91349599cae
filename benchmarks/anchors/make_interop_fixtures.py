"""Writes tests/fixtures/interop/: dictionary files made by the REAL SAELens and sparsify, with their outputs.

lmscope's interop tests (tests/test_dictionaries.py) load these committed files and compare lmscope's encode /
decode / forward with the outputs the real libraries computed, so CI needs neither library. Every file is
written by the library's own save API (SAELens `save_model` / `save_inference_model`, sparsify `save_to_disk`);
this script only fills the parameters with seeded random values and records what the library computes.

Two runs, one per SAELens major version (the v5 layout is the one older files on the Hub still use):

    # SAELens 6.54.12 + eai-sparsify 1.3.3 (benchmarks/anchors_env.sh builds this venv)
    benchmarks/.venv-anchors/bin/python benchmarks/anchors/make_interop_fixtures.py
    # SAELens 5.11.0, in a throwaway venv:
    #   python3 -m venv /tmp/sl5 && /tmp/sl5/bin/pip install torch==2.13.0 'sae-lens<6' 'pyarrow<18'
    /tmp/sl5/bin/python benchmarks/anchors/make_interop_fixtures.py

The SAELens 6 run writes saelens6/, sparsify/ and lmscope_export/ (lmscope's `export_saelens` output, loaded
by real SAELens: the outputs SAELens computes from it), and re-checks the committed saelens5/ files with
SAELens 6's own v5 loader. The SAELens 5 run writes saelens5/ only. Both are deterministic (fixed seeds, inputs
filtered so no pre-activation sits within 1e-3 of a threshold or TopK boundary, where float rounding could
flip a latent; PYTHONHASHSEED=0, as SAELens's save_inference_model orders cfg.json keys by a set); re-running them
rewrites byte-identical files. Each fixture directory holds the library's files
plus `expected.safetensors` (x, and what the library computed: encode, decode = decode(encode), forward) and,
for SAELens, `library.json` (library, version, class, how it was saved, what SAELens itself reads from it).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "fixtures" / "interop"
D_IN, D_OUT, D_SAE, K, N = 8, 12, 24, 3, 16
HOOK, HOOK_OUT, MODEL = "blocks.3.hook_resid_pre", "blocks.3.hook_mlp_out", "gpt2"
MARGIN = 1e-3


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@torch.no_grad()
def fill(module: torch.nn.Module, seed: int, thresholds: tuple[float, float] = (0.05, 0.45)) -> None:
    """Seeded non-trivial values for every parameter/buffer: non-unit decoder rows, biases, positive thresholds."""
    g = gen(seed)
    for name, t in sorted(module.state_dict().items()):
        if not t.is_floating_point():
            continue
        base = name.rsplit(".", 1)[-1]
        if base in ("threshold", "topk_threshold"):
            lo, hi = thresholds
            value = torch.rand(t.shape, generator=g, dtype=torch.float64) * (hi - lo) + lo
        elif base in ("W_enc", "weight"):  # sparsify's encoder.weight
            value = torch.randn(t.shape, generator=g, dtype=torch.float64) * 0.6
        elif base == "W_dec":  # rows of norm ~0.5-1.5, deliberately not 1
            value = torch.randn(t.shape, generator=g, dtype=torch.float64) * 0.35
        elif base in ("r_mag", "finetuning_scaling_factor"):
            value = torch.rand(t.shape, generator=g, dtype=torch.float64) * 0.6 + 0.7
        else:  # b_enc, b_dec, b_gate, b_mag, bias, W_skip
            value = torch.randn(t.shape, generator=g, dtype=torch.float64) * 0.3
        dest = dict(module.named_parameters()).get(name)
        if dest is None:
            dest = dict(module.named_buffers())[name]
        dest.copy_(value.to(dest.dtype))


def inputs(seed: int, d_in: int, ok: Any) -> torch.Tensor:
    """N rows of x for which `ok(rows) -> bool mask` holds (no latent near a boundary), deterministic."""
    x = torch.randn(8 * N, d_in, generator=gen(seed)) * 1.5
    keep = x[ok(x)]
    assert keep.shape[0] >= N, f"only {keep.shape[0]} of {x.shape[0]} rows are clear of every boundary"
    return keep[:N].contiguous()


def clear_of(pre: torch.Tensor, boundaries: torch.Tensor | None = None, k: int | None = None) -> torch.Tensor:
    """Rows whose pre-activations are at least MARGIN away from every threshold / the TopK cut (and from 0)."""
    pre = pre.double()
    ok = (pre.abs() > MARGIN).all(-1)
    if boundaries is not None:
        ok &= ((pre - boundaries.double()).abs() > MARGIN).all(-1)
    if k is not None:
        top = pre.topk(k + 1, dim=-1).values
        ok &= (top[:, k - 1] - top[:, k]).abs() > MARGIN
    return ok


def write_expected(path: Path, x: torch.Tensor, encode: torch.Tensor, decode: torch.Tensor, forward: torch.Tensor,
                   **extra: torch.Tensor) -> None:  # fmt: skip
    tensors = {"x": x, "encode": encode, "decode": decode, "forward": forward, **extra}
    save_file({k: v.detach().float().contiguous() for k, v in tensors.items()}, str(path / "expected.safetensors"))


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def fresh(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


# ------------------------------------------------------------------------------------------------ SAELens 6
def saelens6() -> None:
    import sae_lens
    from sae_lens import (
        SAE,
        BatchTopKTrainingSAE,
        BatchTopKTrainingSAEConfig,
        GatedSAE,
        GatedSAEConfig,
        JumpReLUSAE,
        JumpReLUSAEConfig,
        JumpReLUTranscoder,
        JumpReLUTranscoderConfig,
        SkipTranscoder,
        SkipTranscoderConfig,
        StandardSAE,
        StandardSAEConfig,
        TopKSAE,
        TopKSAEConfig,
        TopKTrainingSAE,
        TopKTrainingSAEConfig,
        Transcoder,
        TranscoderConfig,
    )

    sl_version = sae_lens.__version__
    root = fresh(OUT / "saelens6")
    meta = {"hook_name": HOOK, "model_name": MODEL}
    tmeta = {**meta, "hook_name_out": HOOK_OUT}
    common = {"d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", "device": "cpu"}
    tc = {**common, "d_out": D_OUT, "apply_b_dec_to_input": False}

    def with_meta(cfg: Any, m: dict[str, str]) -> Any:
        for key, value in m.items():
            cfg.metadata[key] = value
        return cfg

    def pre_of(sae: Any, x: torch.Tensor) -> torch.Tensor:
        sae_in = x - sae.b_dec * sae.cfg.apply_b_dec_to_input if sae.b_dec.shape[0] == x.shape[1] else x
        pre = sae_in @ sae.W_enc + sae.b_enc
        if getattr(sae.cfg, "rescale_acts_by_decoder_norm", False):
            pre = pre * sae.W_dec.norm(dim=-1)
        return pre

    # name: (sae, how to save, seed, boundary check, refused by lmscope?, note)
    cases: dict[str, tuple[Any, str, int, str, str]] = {}
    cases["standard"] = (StandardSAE(with_meta(StandardSAEConfig(**common), meta)), "save_model", 11, "relu", "")
    cases["topk"] = (TopKSAE(with_meta(TopKSAEConfig(**common, k=K), meta)), "save_model", 12, "topk", "")
    cases["jumprelu"] = (JumpReLUSAE(with_meta(JumpReLUSAEConfig(**common), meta)), "save_model", 13, "thr", "")
    cases["transcoder"] = (Transcoder(with_meta(TranscoderConfig(**tc), tmeta)), "save_model", 14, "relu", "")
    cases["jumprelu_transcoder"] = (
        JumpReLUTranscoder(with_meta(JumpReLUTranscoderConfig(**tc), tmeta)), "save_model", 15, "thr",
        "",
    )  # fmt: skip
    cases["topk_trained"] = (
        TopKTrainingSAE(with_meta(TopKTrainingSAEConfig(**common, k=K), meta)), "save_inference_model", 16, "topk",
        "what a SAELens training run writes at its end (LanguageModelSAETrainingRunner): the decoder norm folded "
        "into the weights, and rescale_acts_by_decoder_norm still true in cfg.json",
    )  # fmt: skip
    cases["topk_checkpoint"] = (
        TopKTrainingSAE(with_meta(TopKTrainingSAEConfig(**common, k=K), meta)), "save_model", 17, "topk",
        "a SAELens training checkpoint (SAETrainer): training config, rescale_acts_by_decoder_norm true, "
        "decoder norms not folded",
    )  # fmt: skip
    cases["batchtopk_trained"] = (
        BatchTopKTrainingSAE(with_meta(BatchTopKTrainingSAEConfig(**common, k=K), meta)), "save_inference_model",
        18, "thr", "SAELens writes a trained BatchTopK SAE as a JumpReLU SAE (one threshold per latent, all equal)",
    )  # fmt: skip
    cases["batchtopk_checkpoint"] = (
        BatchTopKTrainingSAE(with_meta(BatchTopKTrainingSAEConfig(**common, k=K), meta)), "save_model", 18,
        "thr", "a BatchTopK training checkpoint: architecture batchtopk, a scalar topk_threshold, rescale true. "
        "SAELens's SAE.load_from_disk cannot load it (batchtopk has no inference class); expected.safetensors "
        "holds what SAELens's own inference form of it (batchtopk_trained: same seed, same weights) computes",
    )  # fmt: skip
    cases["jumprelu_negative_thresholds"] = (
        JumpReLUSAE(with_meta(JumpReLUSAEConfig(**common), meta)), "save_model", 19, "thr",
        "thresholds in [-0.3, 0.3]: SAELens computes relu(pre) * (pre > threshold)",
    )  # fmt: skip
    refused: dict[str, tuple[Any, str]] = {
        "gated": (GatedSAE(with_meta(GatedSAEConfig(**common), meta)), "gated SAE: no lmscope architecture"),
        "skip_transcoder": (
            SkipTranscoder(with_meta(SkipTranscoderConfig(**tc), tmeta)), "W_skip: no lmscope architecture"
        ),
        "normalize_expected_average": (
            StandardSAE(with_meta(StandardSAEConfig(**common, normalize_activations="expected_average_only_in"), meta)),
            "the scaling factor is not in the file",
        ),
        "normalize_layer_norm": (
            StandardSAE(with_meta(StandardSAEConfig(**common, normalize_activations="layer_norm"), meta)),
            "per-token normalisation at run time: not foldable into weights",
        ),
        "hook_z": (
            StandardSAE(
                with_meta(
                    StandardSAEConfig(**common, reshape_activations="hook_z"),
                    {**meta, "hook_name": "blocks.3.attn.hook_z"},
                )
            ),
            "input reshaped from [..., n_heads, d_head]",
        ),
    }  # fmt: skip

    for name, (sae, how, seed, check, note) in cases.items():
        torch.manual_seed(seed)
        lo_hi = (-0.3, 0.3) if name == "jumprelu_negative_thresholds" else (0.05, 0.45)
        fill(sae, seed, lo_hi)
        if name.startswith("batchtopk"):
            sae.topk_threshold.fill_(0.25)  # a scalar in units of pre * |W_dec row| (rescale is on by default)
        path = fresh(root / name)
        getattr(sae, how)(path)
        # expected outputs: what SAELens computes, from the file as a user loads it (the inference class)
        src = root / "batchtopk_trained" if name == "batchtopk_checkpoint" else path
        loaded = SAE.load_from_disk(src)
        thr = getattr(loaded, "threshold", None)

        def ok(x: torch.Tensor, loaded: Any = loaded, check: str = check, thr: Any = thr) -> torch.Tensor:
            pre = pre_of(loaded, x).detach()
            return clear_of(pre, thr.detach() if check == "thr" else None, K if check == "topk" else None)

        with torch.no_grad():
            x = inputs(seed + 1000, D_IN, ok)
            z = loaded.encode(x)
            write_expected(path, x, z, loaded.decode(z), loaded(x))
        write_json(path / "library.json", {
            "library": "sae-lens", "version": sl_version, "class": type(sae).__name__, "saved_with": how,
            "outputs_from": f"SAE.load_from_disk({src.name}) -> {type(loaded).__name__}",
            "saelens_reads": {"architecture": loaded.cfg.architecture(), "k": getattr(loaded.cfg, "k", None),
                              "rescale_acts_by_decoder_norm": getattr(loaded.cfg, "rescale_acts_by_decoder_norm", None),
                              "hook_name": loaded.cfg.metadata.hook_name},
            "note": note,
        })  # fmt: skip
        print(f"saelens6/{name}: {type(sae).__name__}.{how}, {int((z != 0).sum())} active latents over {N} rows")

    for name, (sae, why) in refused.items():
        fill(sae, 30)
        path = fresh(root / name)
        sae.save_model(path)
        write_json(path / "library.json", {
            "library": "sae-lens", "version": sl_version, "class": type(sae).__name__, "saved_with": "save_model",
            "lmscope": "refused", "note": why,
        })  # fmt: skip
        print(f"saelens6/{name}: {type(sae).__name__}.save_model (lmscope must refuse it: {why})")

    check_v5_with_saelens6()


def check_v5_with_saelens6() -> None:
    """SAELens 6 loads the committed SAELens 5 files through its own v5 handling: it must compute what SAELens 5 did."""
    from sae_lens import SAE
    from safetensors.torch import load_file

    for path in sorted((OUT / "saelens5").glob("*/expected.safetensors")):
        e = load_file(str(path))
        try:
            sae = SAE.load_from_disk(path.parent)
        except RuntimeError as exc:
            print(f"saelens5/{path.parent.name}: SAELens 6 cannot load it ({' '.join(str(exc).split())})")
            continue
        with torch.no_grad():
            z = sae.encode(e["x"])
            torch.testing.assert_close(z, e["encode"], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(sae.decode(e["encode"]), e["decode"], rtol=1e-5, atol=1e-5)
        print(f"saelens5/{path.parent.name}: SAELens 6 loads it as {type(sae).__name__} and computes the same outputs")


# ------------------------------------------------------------------------------------------------ SAELens 5
def saelens5() -> None:
    import sae_lens
    from sae_lens import SAE, SAEConfig

    root = fresh(OUT / "saelens5")

    def cfg(arch: str, act: str = "relu", kw: dict[str, Any] | None = None, **extra: Any) -> Any:
        base: dict[str, Any] = dict(
            architecture=arch, d_in=D_IN, d_sae=D_SAE, activation_fn_str=act, activation_fn_kwargs=kw or {},
            apply_b_dec_to_input=True, finetuning_scaling_factor=False, context_size=128, model_name=MODEL,
            hook_name=HOOK, hook_layer=3, hook_head_index=None, prepend_bos=True, dataset_path="NeelNanda/pile-10k",
            dataset_trust_remote_code=True, normalize_activations="none", dtype="float32", device="cpu",
            sae_lens_training_version=sae_lens.__version__,
        )  # fmt: skip
        base.update(extra)
        return SAEConfig(**base)

    cases: dict[str, tuple[Any, str, str]] = {
        "standard": (cfg("standard"), "relu", ""),
        "topk": (cfg("topk", "topk", {"k": K}), "topk", "architecture topk, k in activation_fn_kwargs"),
        "standard_topk": (
            cfg("standard", "topk", {"k": K}), "topk",
            "the earlier 5.x TopK layout: architecture standard + activation_fn_str topk",
        ),
        "jumprelu": (cfg("jumprelu"), "thr", ""),
        "finetuning_scaling_factor": (
            cfg("standard", finetuning_scaling_factor=True), "relu",
            "decode multiplies the latents by a per-latent finetuning_scaling_factor tensor. SAELens 5.11's "
            "save_model writes it under that name, but its disk loader only reads `scaling_factor`, so SAELens "
            "itself cannot load this file back (nor can SAELens 6, which dropped the setting)",
        ),
    }  # fmt: skip
    refused = {
        "gated": (cfg("gated"), "gated SAE: no lmscope architecture"),
        "tanh_relu": (cfg("standard", "tanh-relu"), "activation function tanh-relu"),
    }
    for i, (name, (c, check, note)) in enumerate(cases.items()):
        seed = 50 + i
        torch.manual_seed(seed)
        sae = SAE(c)
        fill(sae, seed)
        path = fresh(root / name)
        sae.save_model(path)
        outputs_from = "SAE.load_from_disk"
        try:
            loaded = SAE.load_from_disk(path)
        except RuntimeError as exc:  # finetuning_scaling_factor: see the note written below
            loaded = sae
            outputs_from = f"the SAE object that saved the file: SAE.load_from_disk fails on it ({exc})".strip()
        thr = getattr(loaded, "threshold", None)

        def ok(x: torch.Tensor, loaded: Any = loaded, check: str = check, thr: Any = thr) -> torch.Tensor:
            pre = ((x - loaded.b_dec) @ loaded.W_enc + loaded.b_enc).detach()
            return clear_of(pre, thr.detach() if check == "thr" else None, K if check == "topk" else None)

        with torch.no_grad():
            x = inputs(seed + 1000, D_IN, ok)
            z = loaded.encode(x)
            write_expected(path, x, z, loaded.decode(z), loaded(x))
        write_json(path / "library.json", {
            "library": "sae-lens", "version": sae_lens.__version__, "class": "SAE", "saved_with": "save_model",
            "outputs_from": " ".join(outputs_from.split()), "note": note,
        })  # fmt: skip
        print(f"saelens5/{name}: SAE.save_model ({c.architecture}, {c.activation_fn_str})")
    for name, (c, why) in refused.items():
        sae = SAE(c)
        fill(sae, 70)
        path = fresh(root / name)
        sae.save_model(path)
        write_json(path / "library.json", {
            "library": "sae-lens", "version": sae_lens.__version__, "class": "SAE", "saved_with": "save_model",
            "lmscope": "refused", "note": why,
        })  # fmt: skip
        print(f"saelens5/{name}: SAE.save_model (lmscope must refuse it: {why})")


# ------------------------------------------------------------------------------------------------ sparsify
def sparsify_fixtures() -> None:
    from sparsify import SparseCoder, SparseCoderConfig

    sp_version = version("eai-sparsify")
    root = fresh(OUT / "sparsify")
    cases = {
        # folder/hook: (config, seed); a checkpoint folder holds one sub-folder per hook, as sparsify's Trainer saves
        "sae/layers.3": (SparseCoderConfig(expansion_factor=3, k=4), 81),
        "sae/layers.4": (SparseCoderConfig(expansion_factor=3, k=4), 82),
        "transcoder/layers.3.mlp": (SparseCoderConfig(num_latents=D_SAE, k=4, transcode=True), 83),
    }
    refused = {
        "skip/layers.3.mlp": (
            SparseCoderConfig(num_latents=D_SAE, k=4, transcode=True, skip_connection=True), "W_skip"
        ),
        "groupmax/layers.3": (SparseCoderConfig(num_latents=D_SAE, k=4, activation="groupmax"), "groupmax activation"),
    }  # fmt: skip
    for rel, (c, seed) in cases.items():
        torch.manual_seed(seed)
        sae = SparseCoder(D_IN, c)
        fill(sae, seed)
        path = root / rel
        sae.save_to_disk(path)
        loaded = SparseCoder.load_from_disk(path)

        def ok(x: torch.Tensor, loaded: Any = loaded) -> torch.Tensor:
            sae_in = x if loaded.cfg.transcode else x - loaded.b_dec
            pre = (sae_in @ loaded.encoder.weight.T + loaded.encoder.bias).detach()
            return clear_of(pre, None, loaded.cfg.k)

        with torch.no_grad():
            x = inputs(seed + 1000, D_IN, ok)
            acts, idx, _pre = loaded.encode(x)
            z = torch.zeros(N, loaded.num_latents).scatter_(1, idx, acts)
            write_expected(
                path, x, z, loaded.decode(acts, idx), loaded(x).sae_out, top_acts=acts, top_indices=idx.float()
            )
        write_json(path / "library.json", {
            "library": "eai-sparsify", "version": sp_version, "class": "SparseCoder", "saved_with": "save_to_disk",
            "outputs_from": "SparseCoder.load_from_disk: encode -> (top_acts, top_indices), scattered into "
                            "`encode`; decode(top_acts, top_indices); forward(x).sae_out",
        })  # fmt: skip
        print(f"sparsify/{rel}: SparseCoder.save_to_disk (transcode={c.transcode}, num_latents={loaded.num_latents})")
    for rel, (c, why) in refused.items():
        sae = SparseCoder(D_IN, c)
        fill(sae, 90)
        sae.save_to_disk(root / rel)
        write_json(root / rel / "library.json", {
            "library": "eai-sparsify", "version": sp_version, "class": "SparseCoder", "saved_with": "save_to_disk",
            "lmscope": "refused", "note": why,
        })  # fmt: skip
        print(f"sparsify/{rel}: SparseCoder.save_to_disk (lmscope must refuse it: {why})")


# ------------------------------------------------------------------------------------------------ lmscope -> SAELens
def lmscope_exports() -> None:
    """lmscope's export_saelens, loaded by real SAELens 6: what SAELens computes from lmscope's files."""
    sys.path.insert(0, str(ROOT / "src"))
    import sae_lens
    from sae_lens import SAE

    from lmscope.dictionaries import DictConfig, FormatError, build, export_saelens

    root = fresh(OUT / "lmscope_export")
    cases = {  # name: (arch, d_out, hook_out, seed)
        "relu": ("relu", None, None, 101),
        "topk": ("topk", None, None, 102),
        "batchtopk": ("batchtopk", None, None, 103),
        "jumprelu": ("jumprelu", None, None, 104),
        "relu_transcoder": ("relu", D_OUT, HOOK_OUT, 105),
        "jumprelu_transcoder": ("jumprelu", D_OUT, HOOK_OUT, 106),
        "batchtopk_transcoder": ("batchtopk", D_OUT, HOOK_OUT, 107),
    }
    for name, (arch, d_out, hook_out, seed) in cases.items():
        cfg = DictConfig(arch=arch, d_in=D_IN, d_sae=D_SAE, d_out=d_out, k=K, hook=HOOK, hook_out=hook_out, model=MODEL)
        d = build(cfg, seed=seed).eval()
        fill(d, seed)
        if arch == "batchtopk":
            d.threshold.fill_(0.25)
        path = fresh(root / name)
        export_saelens(d, path)
        sae = SAE.load_from_disk(path)

        def ok(x: torch.Tensor, d: Any = d) -> torch.Tensor:
            pre = d.pre_acts(x).detach()
            thr = getattr(d, "threshold", None)
            return clear_of(pre, None if thr is None else thr.detach().expand(D_SAE), K if d.arch == "topk" else None)

        with torch.no_grad():
            x = inputs(seed + 1000, D_IN, ok)
            z = sae.encode(x)
            write_expected(path, x, z, sae.decode(z), sae(x))
        write_json(path / "library.json", {
            "library": "sae-lens", "version": sae_lens.__version__, "written_by": "lmscope export_saelens",
            "outputs_from": f"SAE.load_from_disk -> {type(sae).__name__}",
            "saelens_reads": {
                "architecture": sae.cfg.architecture(), "hook_name": sae.cfg.metadata.hook_name,
                "hook_name_out": sae.cfg.metadata.hook_name_out, "model_name": sae.cfg.metadata.model_name,
                "d_out": getattr(sae.cfg, "d_out", None), "k": getattr(sae.cfg, "k", None),
            },
        })  # fmt: skip
        print(f"lmscope_export/{name}: SAELens {sae_lens.__version__} loads it as {type(sae).__name__}")
    topk_tc = build(DictConfig(arch="topk", d_in=D_IN, d_sae=D_SAE, d_out=D_OUT, k=K), seed=0)
    try:
        export_saelens(topk_tc, OUT / "lmscope_export" / "_refused")
        raise SystemExit("lmscope exported a TopK transcoder, which SAELens 6 has no class for")
    except FormatError as exc:
        print(f"lmscope_export: TopK transcoder refused ({exc})")


def main() -> None:
    if os.environ.get("PYTHONHASHSEED") != "0":  # save_inference_model orders cfg.json keys by a set: fix the hash seed
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "PYTHONHASHSEED": "0"})
    import sae_lens

    major = int(sae_lens.__version__.split(".")[0])
    print(f"sae-lens {sae_lens.__version__}, torch {torch.__version__}")
    if major == 5:
        saelens5()
        return
    print(f"eai-sparsify {version('eai-sparsify')}")
    saelens6()
    sparsify_fixtures()
    lmscope_exports()
    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"{OUT.relative_to(ROOT)}: {sum(1 for p in OUT.rglob('*') if p.is_file())} files, {total / 1024:.1f} KiB")


if __name__ == "__main__":
    main()
