"""Dictionary files: lmscope's own format, SAELens import/export and EleutherAI sparsify import.

lmscope format, a directory:
    dictionary.safetensors   W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_out], b_dec [d_out],
                             plus the architecture's own (`Dictionary.extra_tensor_shapes`: `threshold`,
                             [d_sae] for jumprelu, a scalar for batchtopk)
    config.json              {"format": "lmscope.dictionary", "version": 1, "config": DictConfig,
                              "normalization": {...}, "training": {...}}

SAELens format: `cfg.json` + `sae_weights.safetensors` with the same four tensors (+ `threshold` [d_sae] for
jumprelu); each architecture names its SAELens counterpart and converts its own tensors (`Dictionary.saelens_arch`,
`to_saelens`, `from_saelens`). sparsify format: a folder per hook with `cfg.json` + `sae.safetensors` holding
`encoder.weight` [d_sae, d_in], `encoder.bias`, `W_dec` [d_sae, d_in], `b_dec`.

Every conversion is checked: tensor names, shapes, the activation function, its k or threshold. Anything
that cannot be represented raises a FormatError that says what and how to fix it; nothing is dropped quietly.
"""

from __future__ import annotations

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
    """Write `cfg.json` + `sae_weights.safetensors` for SAELens.

    The architecture converts its own tensors (`Dictionary.to_saelens`); `metadata.lmscope` records the
    original architecture, so an import restores one SAELens lacks (BatchTopK, exported as JumpReLU).
    """
    path = Path(path)
    cfg = d.cfg
    norm = getattr(d, "metadata", {}).get("normalization", {"kind": "none"})
    if norm.get("kind", "none") != "none" and not norm.get("folded", False):
        raise FormatError("fold the input normalisation into the weights (Dictionary.fold_scale) before exporting")
    if d.saelens_arch is None:
        raise FormatError(f"a {d.arch} dictionary has no SAELens counterpart; save it in lmscope's format instead")
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
            "model_name": cfg.model,
            "hook_name": cfg.hook,
            "lmscope": {"arch": d.arch, "k": cfg.k, "hook_out": cfg.hook_out},
        },
    }
    saelens_cfg.update(extra_cfg)
    if cfg.d_out != cfg.d_in or cfg.hook_out:
        saelens_cfg["d_out"] = cfg.d_out
        saelens_cfg["metadata"]["hook_name_out"] = cfg.hook_out
    _save_tensors(path / SAELENS_WEIGHTS, tensors)
    _write_json(path / SAELENS_CFG, saelens_cfg)
    return path


def load_saelens(path: str | Path, device: str | torch.device = "cpu") -> Dictionary:
    """Load a SAELens `cfg.json` + `sae_weights.safetensors` directory (v6 and the older v5 config layout)."""
    path = Path(path)
    raw = _read_json(path / SAELENS_CFG)
    tensors = _load_tensors(path / SAELENS_WEIGHTS)
    src = str(path)
    meta = raw.get("metadata") or {}
    arch_name = raw.get("architecture", "standard")
    act = raw.get("activation_fn_str") or raw.get("activation_fn") or "relu"
    act_kwargs = raw.get("activation_fn_kwargs") or {}
    if arch_name == "standard" and act == "topk":  # SAELens v5 wrote TopK as standard + activation_fn_str
        arch_name = "topk"
    if arch_name == "standard" and act not in ("relu",):
        raise FormatError(f"{src}: activation function {act!r} is not supported; lmscope converts relu and topk")
    if arch_name in ("gated", "transcoder_gated"):
        raise FormatError(f"{src}: gated SAEs are not supported by lmscope; convert it to JumpReLU first")
    norm = raw.get("normalize_activations", "none") or "none"
    if norm not in ("none", None):
        raise FormatError(
            f"{src}: normalize_activations={norm!r} needs a scaling factor that is not in the weights; in SAELens, "
            "call sae.fold_activation_norm_scaling_factor(...) and save again"
        )
    if raw.get("rescale_acts_by_decoder_norm"):
        raise FormatError(f"{src}: rescale_acts_by_decoder_norm=True is not supported; fold it and save again")
    for key in ("d_in", "d_sae"):
        if key not in raw:
            raise FormatError(f"{src}/{SAELENS_CFG} lacks {key!r}; this is not a SAELens config")
    mapping = _saelens_names()
    if arch_name not in mapping:
        raise FormatError(f"{src}: SAELens architecture {arch_name!r} is not supported ({', '.join(mapping)} are)")
    arch = mapping[arch_name]
    k = raw.get("k", act_kwargs.get("k"))
    lm = meta.get("lmscope") or {}
    marked = lm.get("arch")
    # an lmscope export of an architecture SAELens lacks (its saelens_arch is another's name): restore it
    restored = marked in architectures() and marked != arch and architecture(marked).saelens_arch == arch_name
    if restored:
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
        hook=meta.get("hook_name", raw.get("hook_name")),
        hook_out=meta.get("hook_name_out", raw.get("hook_name_out")) or lm.get("hook_out"),
        model=meta.get("model_name", raw.get("model_name")),
    )
    d = from_tensors(cfg, {k_: v for k_, v in tensors.items()}, src).to(device)
    d.metadata = {"normalization": {"kind": "none"}, "training": {"imported_from": "saelens", "path": src}}  # type: ignore[assignment]
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
