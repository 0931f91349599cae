"""Someone else's dictionary, wherever it came from: `open_dictionary` recognises the format of a path and loads it
with hook names in lmscope's terms; `convert_dictionary` writes it back out (lmscope or SAELens), round-trip exact.

Formats recognised (`detect_format`):
- lmscope: a directory with `config.json` (format lmscope.dictionary) + `dictionary.safetensors`;
- SAELens (v5 and v6 configs): `cfg.json` + `sae_weights.safetensors` (formats.load_saelens);
- sparsify: a hook folder with `cfg.json` + `sae.safetensors`, or the checkpoint folder holding several (then
  `hook` names one, or the error lists them);
- Gemma Scope-style JumpReLU: `params.npz` (numpy arrays, read without pickle) or a `.safetensors` file / a
  directory holding one, with `W_enc` [d_in, d_sae], `W_dec` [d_sae, d_in], `b_enc`, `b_dec`, `threshold`.
  Those files carry no hook name: pass `hook`.
Hook names come back as lmscope's (model.hook_names): TransformerLens's `blocks.6.hook_resid_post` becomes
`blocks.6.resid_post`, sparsify's `layers.6` too; a hook without an exact lmscope equal is refused with the reason.
The name the file used is kept in `d.metadata["training"]["hook_as_saved"]`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmscope.dictionaries.base import DictConfig, Dictionary, FormatError
from lmscope.dictionaries.formats import (
    CONFIG,
    SAELENS_CFG,
    SAELENS_WEIGHTS,
    SPARSIFY_WEIGHTS,
    WEIGHTS,
    export_saelens,
    from_tensors,
    load_dictionary,
    load_saelens,
    load_sparsify,
    save_dictionary,
)
from lmscope.errors import HookError
from lmscope.model import hook_names

FORMATS = ("lmscope", "saelens", "sparsify", "gemmascope")
GEMMA_TENSORS = ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")


def _gemma_file(path: Path) -> Path | None:
    if path.is_file() and path.suffix in (".npz", ".safetensors"):
        return path
    if path.is_dir():
        for name in ("params.npz", "params.safetensors", "model.safetensors"):
            if (path / name).is_file():
                return path / name
    return None


def detect_format(path: str | Path) -> str:
    """Which format `path` holds (one of FORMATS); FormatError naming what was found when none fits."""
    p = Path(path)
    if not p.exists():
        raise FormatError(f"{p} does not exist; --dict takes a dictionary folder (lmscope, SAELens, sparsify) or a "
                          "Gemma Scope params.npz")  # fmt: skip
    if p.is_dir() and (p / CONFIG).is_file() and (p / WEIGHTS).is_file():
        return "lmscope"
    if p.is_dir() and (p / SAELENS_CFG).is_file() and (p / SAELENS_WEIGHTS).is_file():
        return "saelens"
    if p.is_dir() and ((p / SPARSIFY_WEIGHTS).is_file() or any(p.glob(f"*/{SPARSIFY_WEIGHTS}"))):
        return "sparsify"
    g = _gemma_file(p)
    if g is not None:
        return "gemmascope"
    seen = sorted(x.name for x in p.iterdir())[:12] if p.is_dir() else [p.name]
    raise FormatError(
        f"{p} is no dictionary lmscope recognises: it holds {', '.join(seen) or 'nothing'}. Expected "
        f"{CONFIG} + {WEIGHTS} (lmscope), {SAELENS_CFG} + {SAELENS_WEIGHTS} (SAELens), {SPARSIFY_WEIGHTS} per hook "
        "folder (sparsify) or params.npz / a .safetensors with W_enc, W_dec, b_enc, b_dec, threshold (Gemma Scope)"
    )


def _gemma_arrays(f: Path) -> dict[str, torch.Tensor]:
    if f.suffix == ".npz":
        try:
            with np.load(f, allow_pickle=False) as z:
                return {k: torch.from_numpy(np.asarray(z[k], dtype=np.float32).copy()) for k in z.files}
        except (ValueError, OSError, zipfile.BadZipFile) as exc:
            raise FormatError(f"{f} is not a readable .npz of plain arrays ({exc})") from None
    from safetensors.torch import load_file

    try:
        return {k: v.float() for k, v in load_file(str(f)).items()}
    except Exception as exc:  # safetensors raises its own error types
        raise FormatError(f"{f} is not a readable safetensors file ({exc})") from None


def load_gemmascope(path: str | Path, hook: str | None = None, device: str | torch.device = "cpu") -> Dictionary:
    """A Gemma Scope-style JumpReLU SAE (`params.npz` or safetensors: W_enc, W_dec, b_enc, b_dec, threshold): the
    encoder reads raw x (no b_dec subtracted); it fires where W_enc·x + b_enc > threshold."""
    p = Path(path)
    f = _gemma_file(p)
    if f is None:
        raise FormatError(f"{p} holds no params.npz or .safetensors of a Gemma Scope SAE")
    t = _gemma_arrays(f)
    missing = [k for k in GEMMA_TENSORS if k not in t]
    if missing:
        raise FormatError(f"{f}: missing {missing}; a Gemma Scope JumpReLU SAE has {', '.join(GEMMA_TENSORS)}")
    extra = sorted(set(t) - set(GEMMA_TENSORS))
    if extra:
        raise FormatError(f"{f}: unexpected arrays {extra}; lmscope reads {', '.join(GEMMA_TENSORS)} only")
    d_in, d_sae = t["W_enc"].shape
    if t["W_dec"].shape != (d_sae, d_in) or t["b_enc"].shape != (d_sae,) or t["threshold"].shape != (d_sae,):
        raise FormatError(
            f"{f}: shapes W_enc {tuple(t['W_enc'].shape)}, W_dec {tuple(t['W_dec'].shape)}, b_enc "
            f"{tuple(t['b_enc'].shape)}, threshold {tuple(t['threshold'].shape)} do not fit one JumpReLU SAE"
        )
    if t["b_dec"].shape != (d_in,):
        raise FormatError(f"{f}: b_dec has shape {tuple(t['b_dec'].shape)}, expected ({d_in},)")
    cfg = DictConfig(
        arch="jumprelu", d_in=int(d_in), d_sae=int(d_sae), apply_b_dec_to_input=False, hook=hook, token_topk_frac=0.0
    )
    d = from_tensors(cfg, dict(t), str(f)).to(device)
    d.metadata = {"normalization": {"kind": "none"},  # type: ignore[assignment]
                  "training": {"imported_from": "gemmascope", "path": str(f)}}  # fmt: skip
    return d


def _translate(d: Dictionary, fmt: str, hook: str | None) -> Dictionary:
    """Hook names in lmscope's terms (an explicit `hook` wins); the file's own kept in the metadata."""
    saved, saved_out = d.cfg.hook, d.cfg.hook_out
    new: str | None
    new_out: str | None
    try:
        if hook is not None:
            new, new_out = hook_names.to_lmscope(hook), d.cfg.hook_out
        elif fmt == "sparsify" and saved:
            transcoder = d.cfg.d_out != d.cfg.d_in or not d.cfg.apply_b_dec_to_input
            new, new_out = hook_names.from_sparsify(saved, transcoder=transcoder)
        else:
            new = hook_names.to_lmscope(saved) if saved else None
            new_out = hook_names.to_lmscope(saved_out) if saved_out else None
    except HookError as exc:
        raise FormatError(f"{exc} (in the {fmt} dictionary)") from None
    if (new, new_out) != (saved, saved_out):
        d.cfg = dataclasses.replace(d.cfg, hook=new, hook_out=new_out)
        meta: dict[str, Any] = dict(getattr(d, "metadata", {}) or {})
        meta["training"] = {**dict(meta.get("training") or {}), "hook_as_saved": saved,
                            **({"hook_out_as_saved": saved_out} if saved_out else {})}  # fmt: skip
        d.metadata = meta  # type: ignore[assignment]
    return d


def open_dictionary(path: str | Path, device: str | torch.device = "cpu", hook: str | None = None) -> Dictionary:
    """Load a dictionary of any recognised format (see the module doc). `hook`, in any naming lmscope translates,
    picks the hook folder of a sparsify checkpoint, gives a file that names no hook (Gemma Scope) its hook, and
    otherwise replaces the hook the file names (the caller's choice, as `lmscope atlas --hook` does)."""
    p = Path(path)
    fmt = detect_format(p)
    if fmt == "lmscope":
        d = load_dictionary(p, device=device)
        return d if hook is None else _translate(d, fmt, hook)
    if fmt == "saelens":
        d = load_saelens(p, device=device)
    elif fmt == "sparsify":
        d = load_sparsify(p, hook=hook if hook and not (p / SPARSIFY_WEIGHTS).is_file() else None, device=device)
        hook = None if not (p / SPARSIFY_WEIGHTS).is_file() else hook
    else:
        d = load_gemmascope(p, hook=None, device=device)
        if hook is None:
            raise FormatError(f"{p} is a Gemma Scope SAE, which names no hook; pass its hook (e.g. "
                              "blocks.12.resid_post) with --dict-hook (hook= from Python)")  # fmt: skip
    return _translate(d, fmt, hook)


def convert_dictionary(src: str | Path, to: str, out: str | Path, hook: str | None = None) -> Path:
    """Write the dictionary at `src` (any recognised format) to `out` as `to` ('lmscope' or 'saelens'). To SAELens,
    the hook is written in TransformerLens's names where they exist (SAELens users hook with them); back, lmscope
    translates it again, so lmscope -> SAELens -> lmscope gives the same dictionary."""
    if to not in ("lmscope", "saelens"):
        raise FormatError(f"--to {to!r}: choose lmscope or saelens")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FormatError(f"{out} exists and is not empty; choose a new --out folder")
    d = open_dictionary(src, hook=hook)
    if to == "lmscope":
        return save_dictionary(d, out)
    cfg = d.cfg
    names: dict[str, str | None] = {"hook": cfg.hook, "hook_out": cfg.hook_out}
    for key in ("hook", "hook_out"):
        v = names[key]
        if v and hook_names.is_lmscope(v):
            with contextlib.suppress(HookError):  # no TransformerLens name (e.g. mlp_in): keep lmscope's
                names[key] = hook_names.to_transformerlens(v)
    d.cfg = dataclasses.replace(cfg, hook=names["hook"], hook_out=names["hook_out"])
    try:
        return export_saelens(d, out)
    finally:
        d.cfg = cfg
