"""Hook names of other libraries, translated to lmscope's and back.

lmscope names a point `blocks.{L}.{kind}` (families.BLOCK_KINDS) on the unmodified Hugging Face model.
- TransformerLens (and SAELens, which uses its names): `blocks.{L}.hook_resid_pre`, `hook_resid_mid`,
  `hook_resid_post`, `hook_attn_out`, `hook_mlp_out` and `mlp.hook_post` (the MLP's hidden activation, what
  the down projection reads) have exact lmscope equals. Others are refused with the reason: TransformerLens
  folds each norm's gain into the next weights, so `ln1/ln2.hook_normalized` is the stream *before* the gain
  (lmscope's `mlp_in` is after it); `mlp.hook_pre` is a pre-activation lmscope does not hook; the per-head
  attention hooks (`attn.hook_q/k/v/z/result`) are [head, d_head] tensors, not lmscope's flat ones.
  A caveat that names cannot show: by default TransformerLens also centres the writing weights of LayerNorm
  models, so its residual stream is lmscope's minus its mean over d_model (exact for RMSNorm models, and for
  SAEs trained with `from_pretrained_no_processing`). An SAE trained on the centred stream reads lmscope's
  slightly off; its FVU on lmscope (`lmscope eval`) shows how much.
- sparsify names the module whose output it read (`layers.6`, `model.layers.6`, `transformer.h.6`,
  `gpt_neox.layers.6`, ...): a decoder layer's output is `resid_post`, its `mlp`'s is `mlp_out` (a sparsify
  transcoder reads the MLP's input, `mlp_in`, and writes `mlp_out`), its attention module's is `attn_out`.
"""

from __future__ import annotations

import re

from lmscope.errors import HookError

_LMSCOPE = re.compile(r"blocks\.(\d+)\.([a-z_]+)")
_TL = re.compile(r"blocks\.(\d+)\.((?:ln\d|ln2_post|attn|mlp)\.)?(hook_[a-z_]+)")
TL_TO_LMSCOPE = {
    "hook_resid_pre": "resid_pre",
    "hook_resid_mid": "resid_mid",
    "hook_resid_post": "resid_post",
    "hook_attn_out": "attn_out",
    "hook_mlp_out": "mlp_out",
    "mlp.hook_post": "mlp_hidden",
}
LMSCOPE_TO_TL = {v: k for k, v in TL_TO_LMSCOPE.items()}
_NORMALIZED = ("TransformerLens folds the norm's gain into the next weights, so {name} is the stream after the "
               "norm but before its gain; lmscope's mlp_in (and the attention input) is after the whole norm, "
               "and no weights of the SAE can undo the difference")  # fmt: skip
TL_REFUSED = {
    "ln1.hook_normalized": _NORMALIZED,
    "ln2.hook_normalized": _NORMALIZED,
    "ln1.hook_scale": "a norm's scale factor, one number a token; lmscope hooks no such point",
    "ln2.hook_scale": "a norm's scale factor, one number a token; lmscope hooks no such point",
    "mlp.hook_pre": "the MLP's pre-activation; lmscope hooks the MLP's input (mlp_in) and its hidden activation "
    "(mlp_hidden, TransformerLens's mlp.hook_post), not the pre-activation",
    "mlp.hook_pre_linear": "a gated MLP's linear branch; lmscope hooks its product (mlp_hidden) only",
}
_PER_HEAD = ("per-head attention tensors [pos, head, d_head] ({name}); lmscope's attention hooks (attn_q/k/v, "
             "attn_out) are flat and {name} has no exact equal")  # fmt: skip
_SPARSIFY = re.compile(
    r"(?:model\.|transformer\.|gpt_neox\.|base_model\.model\.model\.)?(?:layers|h|blocks|decoder\.layers)\.(\d+)"
    r"(?:\.(mlp|self_attn|attn|attention|feed_forward))?"
)
_SPARSIFY_KIND = {None: "resid_post", "mlp": "mlp_out", "feed_forward": "mlp_out", "self_attn": "attn_out",
                  "attn": "attn_out", "attention": "attn_out"}  # fmt: skip


def is_lmscope(name: str) -> bool:
    return bool(_LMSCOPE.fullmatch(name)) and "hook_" not in name


def from_transformerlens(name: str) -> str:
    """lmscope's name for a TransformerLens hook; HookError saying why when there is no exact equal."""
    m = _TL.fullmatch(name)
    if not m:
        raise HookError(f"{name!r} is not a TransformerLens block hook (blocks.L.hook_...); pass the lmscope name")
    layer, sub, hook = m.group(1), m.group(2) or "", m.group(3)
    key = sub + hook
    if key in TL_TO_LMSCOPE:
        return f"blocks.{layer}.{TL_TO_LMSCOPE[key]}"
    if key in TL_REFUSED:
        raise HookError(f"{name} has no exact lmscope equal: {TL_REFUSED[key].format(name=name)}")
    if sub == "attn.":
        raise HookError(f"{name} has no exact lmscope equal: {_PER_HEAD.format(name=name)}")
    raise HookError(f"{name}: lmscope knows no equal of TransformerLens's {key}; "
                    f"known: {', '.join(sorted(TL_TO_LMSCOPE))}")  # fmt: skip


def to_transformerlens(name: str) -> str:
    """TransformerLens's name for an lmscope hook; HookError when TransformerLens has none."""
    m = _LMSCOPE.fullmatch(name)
    if not m or m.group(2) not in LMSCOPE_TO_TL:
        raise HookError(f"{name} has no TransformerLens equal (those are {', '.join(sorted(LMSCOPE_TO_TL))})")
    return f"blocks.{m.group(1)}.{LMSCOPE_TO_TL[m.group(2)]}"


def from_sparsify(name: str, transcoder: bool = False) -> tuple[str, str | None]:
    """(hook, hook_out) in lmscope's names for a sparsify hookpoint (a module path); a transcoder reads the module's
    input and writes its output."""
    m = _SPARSIFY.fullmatch(name)
    if not m:
        raise HookError(
            f"sparsify hookpoint {name!r} is not a decoder layer or its mlp/attention module (e.g. layers.6, "
            "layers.6.mlp); pass the lmscope hook name instead"
        )
    layer, sub = m.group(1), m.group(2)
    kind = _SPARSIFY_KIND[sub]
    if not transcoder:
        return f"blocks.{layer}.{kind}", None
    if kind != "mlp_out":
        raise HookError(f"a sparsify transcoder at {name!r}: lmscope's transcoders map an MLP's input to its output")
    return f"blocks.{layer}.mlp_in", f"blocks.{layer}.mlp_out"


def to_lmscope(name: str) -> str:
    """Any of the names above (lmscope's own unchanged), as lmscope's."""
    if is_lmscope(name):
        return name
    if name.startswith("blocks.") and "hook_" in name:
        return from_transformerlens(name)
    return from_sparsify(name)[0]
