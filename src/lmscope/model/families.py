"""Declarative maps from lmscope's hook names to the modules of each Hugging Face architecture family.

One naming scheme serves every family:

    embed, blocks.{i}.resid_pre, blocks.{i}.attn_q, blocks.{i}.attn_k, blocks.{i}.attn_v, blocks.{i}.attn_out,
    blocks.{i}.resid_mid, blocks.{i}.mlp_in, blocks.{i}.mlp_hidden, blocks.{i}.mlp_out, blocks.{i}.resid_post,
    final_norm, logits

A *site* says which module carries the value and whether it is that module's input or output, and, for a fused
projection (GPT-2's `c_attn`, GPT-NeoX's `query_key_value`), which columns of its output (`Cols`).
`attn_q` and `attn_k` are the query and key projections before any rotary embedding or q/k norm: the attention
pattern is a function of them alone, so writing their recorded values freezes the pattern (lmscope.circuits does).
`attn_v` is the value projection. `FamilyMap.norms` lists every normalisation module of a block that sits on the
residual or value path (the final norm is the global `final_norm` site): freezing their scales, with the pattern,
makes a block linear in its input apart from the MLP.
`resid_pre` and `resid_post` are always the block's input and output, so they are not listed per family.
`attn_out` and `mlp_out` are exactly what each sublayer adds to the residual stream, after any post-norm
(Gemma 2 and 3, OLMo 2). Paths are relative to the model's base module (`hf_model.base_model`), except
`logits`, which is relative to the top-level model.

Families live in one registry: `register_family(name, model_types=...)` adds a builder (a function of the HF
config returning the family's `FamilyMap`), refusing a family name or an HF `model_type` that is already taken;
`family_for(config)` is the one look-up. Adding a family whose modules are named like an existing layout is one
`register_family` line; otherwise one small builder.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from lmscope.errors import LmscopeError

IO = Literal["in", "out"]

BLOCK_KINDS = (
    "resid_pre", "attn_q", "attn_k", "attn_v", "attn_out", "resid_mid", "mlp_in", "mlp_hidden", "mlp_out", "resid_post"
)  # fmt: skip
GLOBAL_KINDS = ("embed", "final_norm", "logits")


@dataclass(frozen=True)
class Cols:
    """Columns of a fused projection's output: `count` runs of `width` columns, `stride` apart, from `offset`."""

    offset: int
    width: int
    stride: int = 0
    count: int = 1

    def indices(self) -> tuple[int, ...]:
        return tuple(self.offset + j * self.stride + i for j in range(self.count) for i in range(self.width))


@dataclass(frozen=True)
class Site:
    """A module path (relative to the block, or to the base model for global sites), which side, which columns."""

    module: str
    io: IO
    cols: Cols | None = None


@dataclass(frozen=True)
class FamilyMap:
    name: str
    blocks: str
    embed: Site | None
    final_norm: Site | None
    logits: Site | None
    block_sites: dict[str, Site]
    # Hook kinds from the scheme that this family cannot offer, with the reason shown to users.
    missing: dict[str, str] = field(default_factory=dict)
    # True when resid_mid = resid_pre + attn_out and resid_post = resid_mid + mlp_out (pre-norm blocks).
    sequential: bool = True
    # Block-relative paths of the normalisation modules on the residual and value paths (see the module docstring).
    norms: tuple[str, ...] = ()
    # Writing resid_mid at its site (the input of the pre-MLP norm) would not reach the residual branch,
    # because HF has already stored the residual in a local variable. Sequential families therefore write
    # resid_mid as a delta on attn_out. None means the site itself carries the residual (BERT).
    resid_mid_write_via: str | None = "attn_out"


FamilyBuilder = Callable[[Any], FamilyMap]  # HF config -> FamilyMap


class FamilyRegistryError(LmscopeError):
    """A family name or HF model_type registered twice."""


GENERIC = "generic"  # the fallback's name (see `generic_family`); never registered
_BUILDERS: dict[str, FamilyBuilder] = {}  # family name -> builder
_MODEL_TYPES: dict[str, str] = {}  # HF config.model_type -> family name


def register_family(name: str, model_types: Iterable[str] | None = None) -> Callable[[FamilyBuilder], FamilyBuilder]:
    """Decorator: make `builder(config) -> FamilyMap` the hook map of the HF configs whose `model_type` is one
    of `model_types` (default: just `name`). A family name or model_type that is already registered is refused."""
    types = [name] if model_types is None else list(model_types)

    def deco(builder: FamilyBuilder) -> FamilyBuilder:
        if name == GENERIC or name in _BUILDERS:
            raise FamilyRegistryError(f"a model family named {name!r} is already registered; choose another name")
        taken = {t: _MODEL_TYPES[t] for t in types if t in _MODEL_TYPES}
        if taken:
            owners = ", ".join(f"{t!r} (by {f!r})" for t, f in taken.items())
            raise FamilyRegistryError(f"cannot register family {name!r}: model_type {owners} is already registered")
        if len(set(types)) != len(types):
            raise FamilyRegistryError(f"family {name!r} lists a model_type twice: {types}")
        _BUILDERS[name] = builder
        _MODEL_TYPES.update(dict.fromkeys(types, name))
        return builder

    return deco


def families() -> dict[str, str]:
    """Every registered HF model_type and the family that serves it."""
    return dict(_MODEL_TYPES)


def family_for(config: Any) -> FamilyMap | None:
    """The family map for a transformers config, or None when the architecture is unknown."""
    name = _MODEL_TYPES.get(getattr(config, "model_type", ""))
    return _BUILDERS[name](config) if name is not None else None


_QKV = {
    "attn_q": Site("self_attn.q_proj", "out"),
    "attn_k": Site("self_attn.k_proj", "out"),
    "attn_v": Site("self_attn.v_proj", "out"),
}


def _llama_like(name: str) -> FamilyBuilder:
    def build(_: Any) -> FamilyMap:
        return FamilyMap(
            name=name,
            blocks="layers",
            embed=Site("embed_tokens", "out"),
            final_norm=Site("norm", "out"),
            logits=Site("lm_head", "out"),
            block_sites={
                **_QKV,
                "attn_out": Site("self_attn", "out"),
                "resid_mid": Site("post_attention_layernorm", "in"),
                "mlp_in": Site("mlp", "in"),
                "mlp_hidden": Site("mlp.down_proj", "in"),
                "mlp_out": Site("mlp", "out"),
            },
            norms=("input_layernorm", "post_attention_layernorm"),
        )

    return build


def _gemma2_like(name: str) -> FamilyBuilder:
    # Post-norms: the sublayer's contribution is the *output of the post-norm*, not of the sublayer.
    def build(_: Any) -> FamilyMap:
        return FamilyMap(
            name=name,
            blocks="layers",
            embed=Site("embed_tokens", "out"),
            final_norm=Site("norm", "out"),
            logits=Site("lm_head", "out"),
            block_sites={
                **_QKV,
                "attn_out": Site("post_attention_layernorm", "out"),
                "resid_mid": Site("pre_feedforward_layernorm", "in"),
                "mlp_in": Site("mlp", "in"),
                "mlp_hidden": Site("mlp.down_proj", "in"),
                "mlp_out": Site("post_feedforward_layernorm", "out"),
            },
            norms=(
                "input_layernorm",
                "post_attention_layernorm",
                "pre_feedforward_layernorm",
                "post_feedforward_layernorm",
            ),
        )

    return build


@register_family("olmo2")
def _olmo2(_: Any) -> FamilyMap:
    # OLMo 2 has post-norms and no pre-norms: the MLP reads the residual stream directly.
    return FamilyMap(
        name="olmo2",
        blocks="layers",
        embed=Site("embed_tokens", "out"),
        final_norm=Site("norm", "out"),
        logits=Site("lm_head", "out"),
        block_sites={
            **_QKV,
            "attn_out": Site("post_attention_layernorm", "out"),
            "resid_mid": Site("mlp", "in"),
            "mlp_in": Site("mlp", "in"),
            "mlp_hidden": Site("mlp.down_proj", "in"),
            "mlp_out": Site("post_feedforward_layernorm", "out"),
        },
        norms=("post_attention_layernorm", "post_feedforward_layernorm"),
    )


@register_family("gpt2")
def _gpt2(config: Any) -> FamilyMap:
    d = int(config.n_embd)  # c_attn's output is [q | k | v], each d wide
    return FamilyMap(
        name="gpt2",
        blocks="h",
        embed=Site("wte", "out"),
        final_norm=Site("ln_f", "out"),
        logits=Site("lm_head", "out"),
        block_sites={
            "attn_q": Site("attn.c_attn", "out", Cols(0, d)),
            "attn_k": Site("attn.c_attn", "out", Cols(d, d)),
            "attn_v": Site("attn.c_attn", "out", Cols(2 * d, d)),
            "attn_out": Site("attn", "out"),
            "resid_mid": Site("ln_2", "in"),
            "mlp_in": Site("mlp", "in"),
            "mlp_hidden": Site("mlp.c_proj", "in"),
            "mlp_out": Site("mlp", "out"),
        },
        norms=("ln_1", "ln_2"),
    )


@register_family("gpt_neox")
def _gpt_neox(config: Any) -> FamilyMap:
    parallel = bool(getattr(config, "use_parallel_residual", True))
    heads = int(config.num_attention_heads)
    hd = int(config.hidden_size) // heads  # query_key_value's output is [q_h | k_h | v_h] per head h
    sites = {
        "attn_q": Site("attention.query_key_value", "out", Cols(0, hd, 3 * hd, heads)),
        "attn_k": Site("attention.query_key_value", "out", Cols(hd, hd, 3 * hd, heads)),
        "attn_v": Site("attention.query_key_value", "out", Cols(2 * hd, hd, 3 * hd, heads)),
        "attn_out": Site("post_attention_dropout", "out"),
        "mlp_in": Site("mlp", "in"),
        "mlp_hidden": Site("mlp.dense_4h_to_h", "in"),
        "mlp_out": Site("post_mlp_dropout", "out"),
    }
    missing: dict[str, str] = {}
    if parallel:
        missing["resid_mid"] = (
            "GPT-NeoX/Pythia runs attention and MLP in parallel (use_parallel_residual=True): both read "
            "resid_pre and resid_post = resid_pre + attn_out + mlp_out, so no residual stream exists "
            "between them"
        )
    else:
        sites["resid_mid"] = Site("post_attention_layernorm", "in")
    return FamilyMap(
        name="gpt_neox",
        blocks="layers",
        embed=Site("embed_in", "out"),
        final_norm=Site("final_layer_norm", "out"),
        logits=Site("lm_head", "out"),
        block_sites=sites,
        missing=missing,
        norms=("input_layernorm", "post_attention_layernorm"),
        sequential=not parallel,
        resid_mid_write_via=None if parallel else "attn_out",
    )


_BERT_POST_LN = (
    "{family} is post-LayerNorm: each sublayer's output is normalised together with the residual, so no "
    "additive {kind} exists; use resid_mid (after attention) or resid_post"
)


def _bert_like(name: str, logits_module: str) -> FamilyBuilder:
    def build(_: Any) -> FamilyMap:
        return FamilyMap(
            name=name,
            blocks="encoder.layer",
            embed=Site("embeddings", "out"),
            final_norm=None,
            logits=Site(logits_module, "out"),
            block_sites={
                "attn_q": Site("attention.self.query", "out"),
                "attn_k": Site("attention.self.key", "out"),
                "attn_v": Site("attention.self.value", "out"),
                "resid_mid": Site("attention", "out"),
                "mlp_in": Site("intermediate", "in"),
                "mlp_hidden": Site("intermediate", "out"),
            },
            missing={
                "attn_out": _BERT_POST_LN.format(family=name, kind="attn_out"),
                "mlp_out": _BERT_POST_LN.format(family=name, kind="mlp_out"),
                "final_norm": f"{name} has no final norm: its last LayerNorm is inside the last block",
            },
            sequential=False,
            resid_mid_write_via=None,
        )

    return build


# The families lmscope knows. Adding one is a line here when its module names match an existing layout, or one
# small builder above (decorated with `register_family`) when they do not.
for _name in ("llama", "mistral", "qwen2", "qwen3", "smollm3", "gemma"):
    register_family(_name)(_llama_like(_name))
del _name
register_family("gemma2")(_gemma2_like("gemma2"))
register_family("gemma3", model_types=["gemma3_text"])(_gemma2_like("gemma3"))
register_family("bert")(_bert_like("bert", "cls"))
register_family("roberta")(_bert_like("roberta", "lm_head"))


def generic_family(blocks_path: str) -> FamilyMap:
    """Fallback for unknown architectures: only the block boundaries are known."""
    reason = (
        "this architecture has no lmscope hook map, so the generic fallback offers only resid_pre and "
        "resid_post; register a FamilyMap in lmscope/model/families.py to get the rest"
    )
    return FamilyMap(
        name=GENERIC,
        blocks=blocks_path,
        embed=None,
        final_norm=None,
        logits=None,
        block_sites={},
        missing={k: reason for k in (*BLOCK_KINDS, *GLOBAL_KINDS) if k not in ("resid_pre", "resid_post")},
        sequential=False,
        resid_mid_write_via=None,
    )


def __getattr__(name: str) -> Any:
    if name == "FAMILIES":  # lmscope 0.1's model_type -> builder dict; a snapshot now, not the registry itself
        warnings.warn(
            "lmscope.model.families.FAMILIES is deprecated and goes away in lmscope 0.3: look a family up with "
            "family_for(config), list them with families(), add one with register_family(name)",
            DeprecationWarning,
            stacklevel=2,
        )
        return {t: _BUILDERS[f] for t, f in _MODEL_TYPES.items()}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
