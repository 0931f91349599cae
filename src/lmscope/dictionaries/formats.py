"""Dictionary files: lmscope's own format, SAELens import/export and EleutherAI sparsify import.

lmscope format, a directory:
    dictionary.safetensors   W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_out], b_dec [d_out],
                             plus the architecture's own (`Dictionary.extra_tensor_shapes`: `threshold`,
                             [d_sae] for jumprelu, a scalar for batchtopk)
    config.json              {"format": "lmscope.dictionary", "version": 1, "config": DictConfig,
                              "normalization": {...}, "training": {...}}

SAELens format: `cfg.json` + `sae_weights.safetensors` with the same four tensors (+ `threshold` [d_sae] for
jumprelu); each architecture names its SAELens counterpart and converts its own tensors (`Dictionary.saelens_arch`,
`saelens_imports`, `to_saelens`, `from_saelens`; transcoders are SAELens's `transcoder` / `jumprelu_transcoder`).
Both SAELens 6 configs and the v5 layout load. sparsify format: a folder per hook with `cfg.json` +
`sae.safetensors` holding `encoder.weight` [d_sae, d_in], `encoder.bias`, `W_dec` [d_sae, d_in], `b_dec`
(`transcode: true`: the encoder sees x, not x - b_dec).

Every conversion is checked: tensor names, shapes, the activation function, its k or threshold. Settings that
only rescale (SAELens's `rescale_acts_by_decoder_norm`, v5 `finetuning_scaling_factor`) are folded into the
weights, exactly as SAELens computes them, and recorded in `metadata["training"]["folded"]`. Anything that cannot
be represented raises a FormatError that names the setting and how to fix it; nothing is dropped quietly.
tests/fixtures/interop holds files written by the real SAELens and sparsify, with their outputs, that the tests
compare against.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from safetensors.torch import save as st_save
from torch import Tensor

from lmscope.core.atomic import atomic_write_bytes
from lmscope.dictionaries.base import DictConfig, Dictionary, FormatError, architecture, architectures, build

FORMAT = "lmscope.dictionary"
VERSION = 1
WEIGHTS = "dictionary.safetensors"
CONFIG = "config.json"
SAELENS_WEIGHTS = "sae_weights.safetensors"
SAELENS_CFG = "cfg.json"
SPARSIFY_WEIGHTS = "sae.safetensors"
# the SAELens version whose config layout export_saelens writes (checked in tests/fixtures/interop/lmscope_export)
SAELENS_LAYOUT_VERSION = "6.54.12"


def _save_tensors(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> None:
    clean = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, st_save(clean, metadata=metadata))


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FormatError(f"{path} does not exist") from None
    except json.JSONDecodeError as exc:
        raise FormatError(f"{path} is not valid JSON ({exc}); the file is damaged, re-export it") from None


def _load_tensors(path: Path) -> dict[str, Tensor]:
    if not Path(path).is_file():
        raise FormatError(f"{path} does not exist")
    return load_file(str(path))


# ---------------------------------------------------------------------- tensors <-> modules
def dictionary_tensors(d: Dictionary) -> dict[str, Tensor]:
    """The file tensors of a dictionary (SAELens names)."""
    return {name: getattr(d, name).detach() for name in d.tensor_shapes(d.cfg)}


def dictionary_hash(d: Dictionary) -> str:
    """sha256 over the dictionary's tensors (names, dtypes, sizes and bytes, in name order): the fingerprint an atlas
    and a match report record, so the explorer knows which dictionary a report's side is."""
    h = hashlib.sha256()
    for name, t in sorted(d.state_dict().items()):
        t = t.detach().reshape(-1).contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{t.numel()}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def from_tensors(cfg: DictConfig, tensors: dict[str, Tensor], source: str) -> Dictionary:
    """Build a dictionary and fill it, checking that the tensor names and shapes are exactly the expected ones."""
    cls = architecture(cfg.arch)
    expected = cls.tensor_shapes(cfg)
    missing = sorted(set(expected) - set(tensors))
    if missing:
        hint = ""
        own = ", ".join(sorted(set(missing) & set(cls.extra_tensor_shapes(cfg))))
        if own:
            hint = f" A {cfg.arch} dictionary cannot run without its {own}; re-export it with the {own}."
        raise FormatError(f"{source}: missing tensors {missing} for a {cfg.arch} dictionary.{hint}")
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise FormatError(
            f"{source}: unexpected tensors {extra} for a {cfg.arch} dictionary; the file holds an architecture "
            "lmscope does not convert, or its config names the wrong one"
        )
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise FormatError(
                f"{source}: {name} has shape {list(tensors[name].shape)}, expected {list(shape)} from the config "
                f"(d_in={cfg.d_in}, d_sae={cfg.d_sae}, d_out={cfg.d_out}); the config and weights do not match"
            )
    d = build(cfg)
    with torch.no_grad():
        for name in expected:
            getattr(d, name).copy_(tensors[name].to(torch.float32))
    return d


# ---------------------------------------------------------------------- lmscope format
def save_dictionary(
    d: Dictionary,
    path: str | Path,
    normalization: dict[str, Any] | None = None,
    training: dict[str, Any] | None = None,
) -> Path:
    """Save in lmscope's format (weights first, config last, each atomically). Returns the directory."""
    path = Path(path)
    meta = getattr(d, "metadata", {})
    _save_tensors(path / WEIGHTS, dictionary_tensors(d), {"format": FORMAT})
    _write_json(
        path / CONFIG,
        {
            "format": FORMAT,
            "version": VERSION,
            "config": d.cfg.to_dict(),
            "normalization": normalization or meta.get("normalization") or {"kind": "none"},
            "training": training or meta.get("training") or {},
        },
    )
    return path


def load_dictionary(path: str | Path, device: str | torch.device = "cpu") -> Dictionary:
    """Load an lmscope dictionary directory; `d.metadata` holds its normalisation and training provenance."""
    path = Path(path)
    if (path / SAELENS_CFG).exists() and not (path / CONFIG).exists():
        raise FormatError(f"{path} holds a SAELens dictionary; load it with lmscope.dictionaries.formats.load_saelens")
    if (path / SPARSIFY_WEIGHTS).exists() or any(path.glob(f"*/{SPARSIFY_WEIGHTS}")):
        raise FormatError(
            f"{path} holds a sparsify dictionary; load it with lmscope.dictionaries.formats.load_sparsify"
        )
    meta = _read_json(path / CONFIG)
    if meta.get("format") != FORMAT:
        raise FormatError(f"{path / CONFIG} is not an lmscope dictionary config (format={meta.get('format')!r})")
    if int(meta.get("version", 0)) > VERSION:
        raise FormatError(f"{path} uses format version {meta['version']}; this lmscope reads up to {VERSION}: upgrade")
    cfg = DictConfig.from_dict(meta["config"])
    norm = meta.get("normalization", {"kind": "none"})
    if norm.get("kind", "none") != "none" and not norm.get("folded", False):
        raise FormatError(
            f"{path}: its input normalisation ({norm}) is not folded into the weights, and lmscope only loads "
            "dictionaries that take raw activations; re-save it after Dictionary.fold_scale"
        )
    d = from_tensors(cfg, _load_tensors(path / WEIGHTS), str(path / WEIGHTS)).to(device)
    d.metadata = {"normalization": norm, "training": meta.get("training", {})}  # type: ignore[assignment]
    return d


# ---------------------------------------------------------------------- SAELens
def _saelens_names() -> dict[str, str]:
    """SAELens architecture name -> the lmscope architecture it loads as."""
    return {alias: arch for arch in architectures() for alias in architecture(arch).saelens_imports}


def export_saelens(d: Dictionary, path: str | Path) -> Path:
    """Write `cfg.json` + `sae_weights.safetensors` for SAELens (the v6 layout; real SAELens loads it).

    The architecture converts its own tensors and names its SAELens class (`Dictionary.to_saelens`: a
    transcoder, d_out != d_in, exports as SAELens's transcoder class); `metadata.lmscope` records the original
    architecture, so an import restores one SAELens lacks (BatchTopK, exported as JumpReLU).
    `metadata.sae_lens_version` says the config follows SAELens 6's layout: without it SAELens reads the file as
    a v5 config and drops the hook and model names (tests/fixtures/interop/lmscope_export checks this).
    """
    path = Path(path)
    cfg = d.cfg
    norm = getattr(d, "metadata", {}).get("normalization", {"kind": "none"})
    if norm.get("kind", "none") != "none" and not norm.get("folded", False):
        raise FormatError("fold the input normalisation into the weights (Dictionary.fold_scale) before exporting")
    if d.saelens_arch is None:
        raise FormatError(f"a {d.arch} dictionary has no SAELens counterpart; save it in lmscope's format instead")
    if d.cfg.skip:
        raise FormatError(
            "a skip-transcoder (W_skip) has no SAELens export in lmscope yet; save it in lmscope's format instead"
        )
    tensors, extra_cfg = d.to_saelens(dictionary_tensors(d))
    saelens_cfg: dict[str, Any] = {
        "architecture": d.saelens_arch,
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": bool(cfg.apply_b_dec_to_input),
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {
            "sae_lens_version": SAELENS_LAYOUT_VERSION,
            "model_name": cfg.model,
            "hook_name": cfg.hook,
            "lmscope": {
                "arch": d.arch,
                "k": cfg.k,
                "hook_out": cfg.hook_out,
                # how it trained, for an import back (only when it had a TopK phase: older exports stay byte-equal)
                **({"token_topk_frac": cfg.token_topk_frac} if cfg.token_topk_frac else {}),
            },
        },
    }
    saelens_cfg.update(extra_cfg)
    if cfg.d_out != cfg.d_in or cfg.hook_out:
        saelens_cfg["d_out"] = cfg.d_out
        saelens_cfg["metadata"]["hook_name_out"] = cfg.hook_out
    _save_tensors(path / SAELENS_WEIGHTS, tensors)
    _write_json(path / SAELENS_CFG, saelens_cfg)
    return path


# SAELens settings lmscope cannot represent: normalize_activations values that are not folded into the weights
_SAELENS_NORMALIZATION = {
    "expected_average_only_in": "its scaling factor is not in the file; in SAELens, call "
    "sae.fold_activation_norm_scaling_factor(factor) and save again",
    "constant_norm_rescale": "it rescales every input to norm sqrt(d_in) at run time, which no weights can express",
    "layer_norm": "it layer-normalises every input at run time, which no weights can express",
    "covariance_whitening": "the whitening is not in the weights; in SAELens, call sae.fold_activation_whitening(...) "
    "and save again",
}


def _saelens_config(raw: dict[str, Any], tensors: dict[str, Tensor], src: str) -> tuple[str, int | None]:
    """Check a SAELens config (v6 or the v5 layout) and return (SAELens architecture, k); refuse what cannot load.

    SAELens 5 wrote TopK as `architecture: "topk"` (or, earlier, `"standard"`) with `activation_fn_str: "topk"`
    and `activation_fn_kwargs: {"k": ..}`; hook and model names sat at the top level instead of in `metadata`.
    """
    arch_name = str(raw.get("architecture", "standard"))
    act_kwargs = raw.get("activation_fn_kwargs") or {}
    act = raw.get("activation_fn_str") or raw.get("activation_fn") or ("topk" if arch_name == "topk" else "relu")
    if arch_name == "standard" and act == "topk":  # the v5 TopK layout
        arch_name = "topk"
    if arch_name in ("gated", "transcoder_gated"):
        raise FormatError(
            f"{src}: architecture {arch_name!r}: gated SAEs (separate gate and magnitude paths) are not supported by "
            "lmscope; it loads standard, topk, jumprelu and SAELens transcoders"
        )
    if "W_skip" in tensors or "skip" in arch_name:
        raise FormatError(
            f"{src}: architecture {arch_name!r} has a skip connection (W_skip), which lmscope dictionaries do not "
            "have; it cannot be loaded without changing what it computes"
        )
    want = "topk" if arch_name == "topk" else "relu"
    if act != want:
        raise FormatError(
            f"{src}: activation function {act!r} for architecture {arch_name!r} is not supported; lmscope converts "
            "relu (standard, jumprelu, transcoders) and topk"
        )
    norm = raw.get("normalize_activations", "none")
    norm = {False: "none", None: "none", True: "expected_average_only_in"}.get(norm, norm)  # v5 wrote booleans
    if norm != "none":
        why = _SAELENS_NORMALIZATION.get(str(norm), "lmscope only loads dictionaries that take raw activations")
        raise FormatError(f"{src}: normalize_activations={norm!r} is not supported: {why}")
    hook = (raw.get("metadata") or {}).get("hook_name") or raw.get("hook_name") or raw.get("hook_point") or ""
    reshape = raw.get("reshape_activations") or ("hook_z" if "hook_z" in str(hook) else "none")
    if reshape != "none":
        raise FormatError(
            f"{src}: reshape_activations={reshape!r} is not supported: SAELens reshapes its input from "
            "[..., n_heads, d_head] (hook_z), and lmscope dictionaries take flat activation vectors"
        )
    k = raw.get("k", act_kwargs.get("k"))
    if k is not None and float(k) != int(k):
        raise FormatError(f"{src}: k={k} is not a whole number; lmscope's k is an integer")
    return arch_name, (int(k) if k is not None else None)


def _fold_saelens_scalings(
    raw: dict[str, Any], tensors: dict[str, Tensor], src: str
) -> tuple[dict[str, Tensor], list[str]]:
    """Fold SAELens settings that only rescale into the weights (exactly what SAELens computes); list what was folded.

    - `rescale_acts_by_decoder_norm` (TopK / BatchTopK; SAELens 6 training default, and still true in the config
      `save_inference_model` writes after folding): latents are pre * |W_dec row|, decoded as z / |W_dec row|.
      Folded as SAELens itself does on save (`_fold_norm_topk`): W_enc, b_enc times the norm, W_dec divided by it.
      BatchTopK thresholds are already in those units.
    - `finetuning_scaling_factor` (v5): decode multiplies latent i by s_i, folded into W_dec's rows. SAELens 5's
      `save_model` writes s as `finetuning_scaling_factor`, its disk loader reads it as `scaling_factor` (and drops
      one of all ones); both are read here.
    """
    folded: list[str] = []
    t = dict(tensors)
    if raw.get("rescale_acts_by_decoder_norm"):
        if not {"W_enc", "b_enc", "W_dec"} <= set(t):
            raise FormatError(f"{src}: rescale_acts_by_decoder_norm=True but W_enc, b_enc or W_dec is missing")
        n = t["W_dec"].float().norm(dim=-1).clamp_min(1e-8)
        t["W_enc"] = t["W_enc"].float() * n
        t["b_enc"] = t["b_enc"].float() * n
        t["W_dec"] = t["W_dec"].float() / n[:, None]
        folded.append("rescale_acts_by_decoder_norm")
    if "scaling_factor" in t and torch.allclose(t["scaling_factor"].float(), torch.ones(())):
        del t["scaling_factor"]  # SAELens wrote ones here for a while and drops them on load (so does lmscope)
    if "scaling_factor" in t and not raw.get("finetuning_scaling_factor"):
        raise FormatError(f"{src}: the weights hold a scaling_factor but finetuning_scaling_factor is not set")
    if raw.get("finetuning_scaling_factor"):
        s = t.pop("finetuning_scaling_factor", None)
        s = t.pop("scaling_factor", None) if s is None else s
        if s is None or "W_dec" not in t:
            raise FormatError(
                f"{src}: finetuning_scaling_factor=True but the weights hold no finetuning_scaling_factor"
            )
        t["W_dec"] = t["W_dec"].float() * s.float()[:, None]
        folded.append("finetuning_scaling_factor")
    return t, folded


def load_saelens(path: str | Path, device: str | torch.device = "cpu") -> Dictionary:
    """Load a SAELens `cfg.json` + `sae_weights.safetensors` directory (v6 and the older v5 config layout).

    Loads standard, topk, jumprelu (and SAELens 6's BatchTopK checkpoints) SAEs and the transcoder and
    jumprelu_transcoder classes; settings that only rescale are folded into the weights (recorded in
    `d.metadata["training"]["folded"]`); anything lmscope cannot compute exactly is refused, naming the setting.
    """
    path = Path(path)
    raw = _read_json(path / SAELENS_CFG)
    tensors = _load_tensors(path / SAELENS_WEIGHTS)
    src = str(path)
    meta = raw.get("metadata") or {}
    for key in ("d_in", "d_sae"):
        if key not in raw:
            raise FormatError(f"{src}/{SAELENS_CFG} lacks {key!r}; this is not a SAELens config")
    arch_name, k = _saelens_config(raw, tensors, src)
    mapping = _saelens_names()
    if arch_name not in mapping:
        raise FormatError(f"{src}: SAELens architecture {arch_name!r} is not supported ({', '.join(mapping)} are)")
    arch = mapping[arch_name]
    tensors, folded = _fold_saelens_scalings(raw, tensors, src)
    lm = meta.get("lmscope") or {}
    marked = lm.get("arch")
    # an lmscope export of an architecture SAELens lacks (exported under another's SAELens class): restore it
    restored = (
        marked in architectures() and marked != arch and mapping.get(str(architecture(marked).saelens_arch)) == arch
    )
    if restored or (marked == arch and k is None):  # k of an lmscope export SAELens has no k for (kept for its cfg)
        arch = str(marked)
        k = lm.get("k", k)
    tensors, k = architecture(arch).from_saelens(tensors, k, src, restored)
    cfg = DictConfig(
        arch=arch,
        d_in=int(raw["d_in"]),
        d_sae=int(raw["d_sae"]),
        d_out=int(raw.get("d_out") or raw["d_in"]),
        k=int(k) if k is not None else 32,
        apply_b_dec_to_input=bool(raw.get("apply_b_dec_to_input", True)),
        hook=meta.get("hook_name") or raw.get("hook_name") or raw.get("hook_point"),
        hook_out=meta.get("hook_name_out") or raw.get("hook_name_out") or lm.get("hook_out"),
        model=meta.get("model_name") or raw.get("model_name"),
        # an lmscope export says how it was trained; a file SAELens trained did not have lmscope's TopK phase
        token_topk_frac=float(lm.get("token_topk_frac", 0.0)) if lm.get("arch") == arch else 0.0,
    )
    d = from_tensors(cfg, {k_: v for k_, v in tensors.items()}, src).to(device)
    training: dict[str, Any] = {"imported_from": "saelens", "path": src}
    if folded:
        training["folded"] = folded
    d.metadata = {"normalization": {"kind": "none"}, "training": training}  # type: ignore[assignment]
    return d


# ---------------------------------------------------------------------- sparsify
def load_sparsify(path: str | Path, hook: str | None = None, device: str | torch.device = "cpu") -> Dictionary:
    """Load an EleutherAI sparsify TopK SAE: a hook folder (`cfg.json` + `sae.safetensors`) or its parent + hook."""
    path = Path(path)
    if not (path / SPARSIFY_WEIGHTS).exists():
        hooks = sorted(p.parent.name for p in path.glob(f"*/{SPARSIFY_WEIGHTS}"))
        if not hooks:
            raise FormatError(f"{path} holds no {SPARSIFY_WEIGHTS}; point at a sparsify checkpoint folder")
        if hook is None:
            raise FormatError(f"{path} holds several sparsify SAEs; pass hook= one of {', '.join(hooks)}")
        if hook not in hooks:
            raise FormatError(f"{path} has no SAE for hook {hook!r}; it has {', '.join(hooks)}")
        path = path / hook
    raw = _read_json(path / "cfg.json")
    t = _load_tensors(path / SPARSIFY_WEIGHTS)
    src = str(path)
    activation = raw.get("activation", "topk")
    if activation != "topk":
        raise FormatError(f"{src}: sparsify activation {activation!r} is not supported; lmscope converts topk")
    if raw.get("skip_connection") or "W_skip" in t:
        raise FormatError(f"{src}: sparsify skip connections (W_skip) are not supported by lmscope dictionaries")
    need = {"encoder.weight", "encoder.bias", "W_dec", "b_dec"}
    if not need <= set(t):
        raise FormatError(f"{src}: missing tensors {sorted(need - set(t))}; this is not a sparsify SAE")
    if set(t) - need:
        raise FormatError(f"{src}: unexpected tensors {sorted(set(t) - need)} in a sparsify SAE")
    m, d_in = t["encoder.weight"].shape
    if "k" not in raw:
        raise FormatError(f"{src}/cfg.json lacks k; a sparsify TopK SAE always has one")
    if raw.get("d_in") not in (None, d_in):
        raise FormatError(f"{src}: cfg.json says d_in={raw['d_in']} but encoder.weight has {d_in} columns")
    if raw.get("num_latents") not in (None, 0, m):
        raise FormatError(f"{src}: cfg.json says num_latents={raw['num_latents']} but the encoder has {m} rows")
    d_out = int(t["W_dec"].shape[1])
    transcode = bool(raw.get("transcode", False))
    cfg = DictConfig(
        arch="topk",
        d_in=int(d_in),
        d_sae=int(m),
        d_out=d_out,
        k=int(raw["k"]),
        apply_b_dec_to_input=not transcode,
        hook=hook or path.name,
    )
    tensors = {"W_enc": t["encoder.weight"].T, "b_enc": t["encoder.bias"], "W_dec": t["W_dec"], "b_dec": t["b_dec"]}
    d = from_tensors(cfg, tensors, src).to(device)
    d.metadata = {"normalization": {"kind": "none"}, "training": {"imported_from": "sparsify", "path": src}}  # type: ignore[assignment]
    return d
