"""The dictionary interface shared by every architecture, its config and the architecture registry.

A dictionary maps an input activation x [..., d_in] to sparse latents z [..., d_sae] and back to a
reconstruction of a target [..., d_out]. For a sparse autoencoder the target is x itself (d_out = d_in);
for a transcoder it is another hook (e.g. `blocks.{i}.mlp_in` -> `blocks.{i}.mlp_out`).

    pre    = (x - b_dec) @ W_enc + b_enc          (b_dec is subtracted only when apply_b_dec_to_input)
    z      = activation(pre)                       (ReLU, TopK, BatchTopK or JumpReLU)
    x_hat  = z @ W_dec + b_dec

Weights are stored in SAELens orientation: W_enc [d_in, d_sae], W_dec [d_sae, d_out], so row i of W_dec is
latent i's decoder direction.

Each architecture is one module: a `Dictionary` subclass registered with `@register(name)` that declares
everything the rest of lmscope needs to know about it (see `Dictionary`'s class attributes: the sparsity
hyperparameter a sweep varies and a run name shows, the default learning rate, its loss terms, the extra
tensors its files hold, its SAELens name and conversions, its config checks). Nothing outside that module
branches on the architecture's name.
"""

from __future__ import annotations

import dataclasses
import math
import string
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmscope.core import native
from lmscope.dictionaries.metrics import fvu as fvu  # re-exported: lmscope.dictionaries.base.fvu
from lmscope.errors import LmscopeError


class DictionaryError(LmscopeError):
    """A dictionary config, architecture or file is invalid."""


class FormatError(DictionaryError):
    """A dictionary file is missing, malformed, or cannot be converted without loss."""


@dataclass
class DictConfig:
    """Everything needed to rebuild a dictionary's modules (hyperparameters of the loss included)."""

    arch: str
    d_in: int
    d_sae: int
    d_out: int | None = None  # transcoders: width of the target hook; None means d_in (an autoencoder)
    k: int = 32  # topk / batchtopk: active latents per token
    l1_coeff: float = 5.0  # relu: weight of the decoder-norm-weighted L1 penalty
    l1_warmup_frac: float = 0.05  # relu: the L1 weight ramps up linearly over this fraction of training
    l0_coeff: float = 1e-3  # jumprelu: weight of the straight-through L0 penalty
    # relu / jumprelu: the mean L0 to reach; the trainer then adjusts the sparsity coefficient during training, from a
    # twentieth of l1_coeff / l0_coeff upward (lmscope.training.sparsity_control). None: the coefficient, fixed
    target_l0: float | None = None
    jumprelu_bandwidth: float = 0.05  # jumprelu: width of the rectangle kernel of the pseudo-derivative
    jumprelu_init_threshold: float = 0.05
    aux_k: int | None = None  # topk / batchtopk: latents used by the AuxK loss; None means d_out // 2
    # matryoshka: the nested groups of latents, as fractions of d_sae (summing to 1) or latent counts (summing to
    # d_sae); prefix i is groups 0..i. Empty: 1/16, 1/16, 1/8, 1/4, 1/2 (Bussmann et al. 2025)
    matryoshka_groups: list[float] = field(default_factory=list)
    # batchtopk / matryoshka / jumprelu / relu: the first fraction of training selects each token's top k (TopK; relu
    # and jumprelu: the target L0 when set, else k) before the architecture's own selection takes over
    # (dictionaries/topk_phase.py); 0: no TopK phase. None: the architecture's default (`Dictionary.default_topk_phase`:
    # 0.75 for batchtopk and matryoshka, 0.875 for jumprelu and relu, 0 for topk)
    token_topk_frac: float | None = None
    aux_coeff: float = 1 / 32
    apply_b_dec_to_input: bool | None = None  # None: True for autoencoders, False for transcoders
    hook: str | None = None  # the input hook, e.g. blocks.6.resid_post
    hook_out: str | None = None  # transcoders: the target hook
    skip: bool = False  # transcoders: add an affine skip term x @ W_skip [d_in, d_out] (a skip-transcoder)
    n_models: int = 1  # crosscoders: the input is n_models activations side by side, each d_in / n_models wide
    model: str | None = None  # the model spec the activations came from
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        cls = architecture(self.arch)
        if self.token_topk_frac is None:
            self.token_topk_frac = cls.default_topk_phase
        elif self.token_topk_frac and not cls.has_topk_phase:
            raise DictionaryError(
                f"token_topk_frac={self.token_topk_frac:g}: a {self.arch} dictionary has no TopK phase (those that do: "
                f"{', '.join(a for a in architectures() if architecture(a).has_topk_phase)}); leave it unset"
            )
        elif not 0.0 <= self.token_topk_frac < 1.0:
            raise DictionaryError(
                f"token_topk_frac={self.token_topk_frac:g} is out of range: it is the fraction of training that "
                "selects each token's top k before the architecture's own selection, in [0, 1) (0: no TopK phase)"
            )
        for name in ("d_in", "d_sae", "k"):
            if int(getattr(self, name)) < 1:
                raise DictionaryError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.d_out is None:
            self.d_out = self.d_in
        if self.apply_b_dec_to_input is None:
            self.apply_b_dec_to_input = self.d_out == self.d_in and self.hook_out is None
        if self.apply_b_dec_to_input and self.d_out != self.d_in:
            raise DictionaryError(
                f"apply_b_dec_to_input needs d_out == d_in, got {self.d_in} -> {self.d_out}; set it to False "
                "for transcoders"
            )
        cls.validate_config(self)
        self._check_target_l0(cls)
        if self.skip and not self.is_transcoder:
            raise DictionaryError("skip=True is for transcoders (hook -> hook_out); an autoencoder has no skip term")
        if self.n_models < 1 or self.d_in % self.n_models:
            raise DictionaryError(f"n_models must divide d_in ({self.d_in}), got {self.n_models}")
        if self.n_models > 1 and self.is_transcoder:
            raise DictionaryError("a crosscoder (n_models > 1) reconstructs its own input; it cannot be a transcoder")
        if self.aux_k is None:
            self.aux_k = max(1, min(self.d_sae, int(self.d_out) // 2))

    def _check_target_l0(self, cls: type[Dictionary]) -> None:
        if self.target_l0 is None:
            return
        if cls.controlled_coeff is None:
            raise DictionaryError(
                f"target_l0={self.target_l0:g}: a {self.arch} dictionary has no sparsity coefficient to adjust "
                f"(its L0 is set by {cls.sparsity_param}); set {cls.sparsity_param} instead"
            )
        if not (0 < float(self.target_l0) < self.d_sae and math.isfinite(self.target_l0)):
            raise DictionaryError(
                f"target_l0={self.target_l0:g} is out of range; it must be in (0, d_sae={self.d_sae}) active latents "
                "per token"
            )

    @property
    def is_transcoder(self) -> bool:
        return not self.apply_b_dec_to_input

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DictConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        if "token_topk_frac" not in data:  # written before the TopK phase existed: trained with batch selection only
            data = {**data, "token_topk_frac": 0.0}
        unknown = sorted(set(data) - known)
        if unknown:
            raise DictionaryError(
                f"dictionary config has unknown keys {unknown}; it was written by a newer lmscope or is not an "
                "lmscope config (use lmscope.dictionaries.formats.load_saelens / load_sparsify for those)"
            )
        return cls(**data)


@dataclass
class LossState:
    """What the trainer tells a dictionary about training when it asks for the loss."""

    progress: float = 1.0  # fraction of training done, in [0, 1]: step / total_steps
    step: int = 0  # this step's index (0-based) and the run's length: a resumed run sees the same values
    total_steps: int = 1
    dead_mask: Tensor | None = None  # [d_sae] bool: latents that have not fired over the dead window
    # the sparsity coefficient a controller chose for this step (`Dictionary.controlled_coeff`, cfg.target_l0 set):
    # it replaces the config's coefficient (the warmup ramp still applies). None: the config's coefficient
    sparsity_coeff: float | None = None


@dataclass
class TrainOutput:
    """The result of one training forward pass: the loss, its terms and what the bookkeeping needs."""

    loss: Tensor
    recon: Tensor
    fired: Tensor  # [d_sae] float: how many tokens of the batch each latent fired on
    l0: Tensor  # mean number of active latents per token (a detached scalar)
    terms: dict[str, Tensor]  # detached scalars: mse, l1, aux, ...


class Dictionary(nn.Module):
    """The shared interface: `encode`, `decode`, `forward` -> (reconstruction, latents), `decoder_directions`.

    A subclass is one architecture. Besides `activation` and `training_loss` it must declare (`register`
    refuses it otherwise) the class attributes in `REQUIRED_KNOWLEDGE` and the classmethod `default_lr`;
    `extra_tensor_shapes`, `validate_config`, `to_saelens` and `from_saelens` have defaults to override.
    """

    arch: ClassVar[str]  # set by `register`
    unit_norm_decoder: ClassVar[bool] = True  # renormalise decoder rows after each step (all but relu)
    crosscoder_only: ClassVar[bool] = False  # made for paired activations of n_models models (not an SAE choice)
    # ---- per-architecture knowledge, declared by every registered subclass
    sparsity_param: ClassVar[str]  # the DictConfig field a sweep varies ("k", "l1_coeff", ...)
    run_tag: ClassVar[str]  # run-name part, a format string over DictConfig fields ("k{k}", "l1_{l1_coeff:g}")
    loss_terms: ClassVar[tuple[str, ...]]  # the keys of TrainOutput.terms ("mse", "aux", ...)
    saelens_arch: ClassVar[str | None]  # the SAELens architecture it exports as (None: it cannot be exported)
    saelens_imports: ClassVar[tuple[str, ...]]  # SAELens architecture names loaded as this architecture
    # the DictConfig field of the penalty weight a target L0 controls (relu: l1_coeff); None: cfg.target_l0 is refused
    controlled_coeff: ClassVar[str | None] = None
    # trains with a TopK phase first (`DictConfig.token_topk_frac`, dictionaries/topk_phase.py), by default for this
    # fraction of training
    has_topk_phase: ClassVar[bool] = False
    default_topk_phase: ClassVar[float] = 0.0
    # with a TopK phase and a target L0: where the controller starts, as a fraction of the config's coefficient
    # (None: ControlSettings.start, as without a phase)
    control_start_after_phase: ClassVar[float | None] = None
    REQUIRED_KNOWLEDGE: ClassVar[tuple[str, ...]] = (
        "sparsity_param", "run_tag", "loss_terms", "saelens_arch", "saelens_imports"
    )  # fmt: skip

    # ------------------------------------------------------------------ per-architecture knowledge
    @classmethod
    def default_lr(cls, cfg: DictConfig) -> float:
        """The peak learning rate used when a run does not give one (every architecture overrides this)."""
        raise NotImplementedError

    @classmethod
    def run_name_tag(cls, cfg: DictConfig) -> str:
        """The part of a run's default name that tells its sparsity setting apart, e.g. `k32`, `l1_5`, `l0target_20`."""
        if cfg.target_l0 is not None:
            return f"l0target_{cfg.target_l0:g}"
        return cls.run_tag.format_map(vars(cfg))

    @classmethod
    def target_l0(cls, cfg: DictConfig) -> float | None:
        """The mean L0 this dictionary is meant to have (what health checks compare with): cfg.target_l0 when set."""
        return cfg.target_l0

    def penalty_coeff(self, state: LossState, ramp_frac: float) -> float:
        """The sparsity penalty's weight this step: the controller's coefficient when it sets one, else the config's
        (`controlled_coeff`), ramped up linearly over the first `ramp_frac` of training."""
        assert self.controlled_coeff is not None
        coeff = state.sparsity_coeff if state.sparsity_coeff is not None else getattr(self.cfg, self.controlled_coeff)
        ramp = min(1.0, state.progress / ramp_frac) if ramp_frac > 0 else 1.0
        return float(coeff) * ramp

    @classmethod
    def extra_tensor_shapes(cls, cfg: DictConfig) -> dict[str, tuple[int, ...]]:
        """File tensors beyond W_enc, b_enc, W_dec, b_dec (attributes of the module), with their shapes."""
        return {}

    @classmethod
    def tensor_shapes(cls, cfg: DictConfig) -> dict[str, tuple[int, ...]]:
        """Every tensor a file of this architecture holds, with its shape (SAELens names)."""
        d_out = int(cfg.d_out or cfg.d_in)
        shapes: dict[str, tuple[int, ...]] = {
            "W_enc": (cfg.d_in, cfg.d_sae),
            "b_enc": (cfg.d_sae,),
            "W_dec": (cfg.d_sae, d_out),
            "b_dec": (d_out,),
        }
        if cfg.skip:
            shapes["W_skip"] = (cfg.d_in, d_out)
        return {**shapes, **cls.extra_tensor_shapes(cfg)}

    @classmethod
    def validate_config(cls, cfg: DictConfig) -> None:
        """Raise DictionaryError when `cfg` cannot describe a dictionary of this architecture."""

    def to_saelens(self, tensors: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """(tensors, extra cfg.json keys) of a SAELens export of this dictionary, from its file tensors."""
        return tensors, {}

    @classmethod
    def from_saelens(
        cls, tensors: dict[str, Tensor], k: int | None, src: str, restored: bool
    ) -> tuple[dict[str, Tensor], int | None]:
        """Check and adapt a SAELens file's tensors and k; raise FormatError when it cannot run as this architecture.

        `restored` is True when the file is an lmscope export of this architecture under another SAELens name
        (`saelens_arch`), to be turned back into it.
        """
        return tensors, k

    def __init__(self, cfg: DictConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d_in, d_sae, d_out = cfg.d_in, cfg.d_sae, int(cfg.d_out or cfg.d_in)
        self.W_enc = nn.Parameter(torch.empty(d_in, d_sae))
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.W_dec = nn.Parameter(torch.empty(d_sae, d_out))
        self.b_dec = nn.Parameter(torch.zeros(d_out))
        if cfg.skip:  # a skip-transcoder's affine term, zero at the start
            self.W_skip = nn.Parameter(torch.zeros(d_in, d_out))
        self.reset_parameters()

    # ------------------------------------------------------------------ init
    def initial_decoder_norm(self) -> float:
        return 1.0

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Unit-norm random decoder rows (scaled per architecture); the encoder is the decoder's transpose."""
        d_sae, d_out = self.W_dec.shape
        w = torch.randn(d_sae, d_out, generator=generator)
        w = w / w.norm(dim=1, keepdim=True) * self.initial_decoder_norm()
        self.W_dec.copy_(w)
        if self.cfg.d_in == d_out:
            self.W_enc.copy_(w.T)
        else:  # a transcoder: no transpose exists, so a matching random unit-norm encoder
            e = torch.randn(self.cfg.d_in, d_sae, generator=generator)
            self.W_enc.copy_(e / e.norm(dim=0, keepdim=True) * self.initial_decoder_norm())
        self.b_enc.zero_()
        self.b_dec.zero_()
        if self.cfg.skip:
            self.W_skip.zero_()

    # ------------------------------------------------------------------ the interface
    def pre_acts(self, x: Tensor) -> Tensor:
        pre = x @ self.W_enc + self.b_enc
        if self.cfg.apply_b_dec_to_input:
            # (x - b_dec) @ W_enc, written so that no gradient of size [batch, d_in] is ever formed
            pre = pre - self.b_dec @ self.W_enc
        return pre

    def activation(self, pre: Tensor) -> Tensor:
        """Dense latents from pre-activations (inference behaviour)."""
        raise NotImplementedError

    def encode(self, x: Tensor) -> Tensor:
        return self.activation(self.pre_acts(x))

    def decode(self, z: Tensor) -> Tensor:
        return z @ self.W_dec + self.b_dec

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        z = self.encode(x)
        return self.with_skip(self.decode(z), x), z

    def with_skip(self, recon: Tensor, x: Tensor) -> Tensor:
        """A skip-transcoder's output: the reconstruction plus x @ W_skip (unchanged without a skip term)."""
        return recon + x @ self.W_skip if self.cfg.skip else recon

    @property
    def decoder_directions(self) -> Tensor:
        """[d_sae, d_out]: row i is the direction latent i writes."""
        return self.W_dec

    # ------------------------------------------------------------------ training
    def training_loss(self, x: Tensor, target: Tensor, state: LossState) -> TrainOutput:
        raise NotImplementedError

    def mse(self, target: Tensor, recon: Tensor) -> Tensor:
        """Squared error summed over the width, averaged over tokens (one fused pass forward and one backward)."""
        if recon.shape != target.shape:  # a broadcast target: the elementwise form broadcasts as before
            return (recon - target).pow(2).sum(-1).mean()
        return F.mse_loss(recon, target, reduction="sum") / max(1, recon.numel() // max(1, recon.shape[-1]))

    @torch.no_grad()
    def post_step(self) -> None:
        """Called by the trainer after each optimiser step: re-impose the architecture's constraints."""
        self.normalize_decoder()

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        if self.unit_norm_decoder:
            self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))

    @torch.no_grad()
    def remove_parallel_grad(self) -> float | None:
        """Drop the part of each decoder row's gradient that would only change its (fixed) norm.

        Returns the squared norm of the projected gradient where it came in the same pass (the C kernel of
        core/native.py, float32 CPU tensors), for gradient clipping to reuse; None otherwise.
        """
        if not (self.unit_norm_decoder and self.W_dec.grad is not None):
            return None
        w, g = self.W_dec, self.W_dec.grad
        if _native_projectable(w, g):
            lib = native.library()
            if lib is not None:
                return float(lib.lmscope_project_rows(g.data_ptr(), w.data_ptr(), *w.shape, torch.get_num_threads()))
        # g -= (g . w) w / |w|^2 row by row. The row dot products as a product and a row sum: einsum("ij,ij->i")
        # avoids the [d_sae, d_out] temporary but runs as a batched matmul of 1x1 results, 10x slower on a CPU
        sq = torch.linalg.vector_norm(w, dim=1).square_().clamp_min_(1e-16)
        g.addcmul_(w, (g * w).sum(1).div_(sq).unsqueeze(1), value=-1)
        return None

    @torch.no_grad()
    def fold_scale(self, scale_in: float, scale_out: float) -> None:
        """Fold input normalisation into the weights: trained on (s_in x -> s_out y), it then maps x -> y."""
        if self.cfg.apply_b_dec_to_input and not math.isclose(scale_in, scale_out):
            raise DictionaryError("an autoencoder needs one scale for input and target; got two different ones")
        self.W_enc.mul_(scale_in)
        self.W_dec.div_(scale_out)
        self.b_dec.div_(scale_out)
        if self.cfg.skip:  # trained on s_in x -> s_out y: y = x (s_in / s_out) W_skip
            self.W_skip.mul_(scale_in / scale_out)

    def extra_repr(self) -> str:
        return f"arch={self.arch}, d_in={self.cfg.d_in}, d_sae={self.cfg.d_sae}, d_out={self.cfg.d_out}"


def _native_projectable(w: Tensor, g: Tensor) -> bool:
    """Whether the decoder and its gradient suit the C projection: 2-D float32 CPU, contiguous, not aliased."""
    return (
        w.dim() == 2
        and w.dtype == g.dtype == torch.float32
        and w.device.type == g.device.type == "cpu"
        and w.shape == g.shape
        and w.is_contiguous()
        and g.is_contiguous()
        and w.numel() > 0
        and w.data_ptr() != g.data_ptr()
    )


_REGISTRY: dict[str, type[Dictionary]] = {}


_CONFIG_FIELDS = frozenset(f.name for f in dataclasses.fields(DictConfig))


def _declares(cls: type[Dictionary], name: str) -> bool:
    """Whether `cls` or a base below Dictionary defines `name` (Dictionary's own annotation or stub does not count)."""
    return any(name in vars(k) for k in cls.__mro__ if k is not Dictionary and issubclass(k, Dictionary))


def _check_knowledge(name: str, cls: type[Dictionary]) -> None:
    """Refuse an architecture class that leaves out something the trainer, the CLI or the file formats need."""
    if not (isinstance(cls, type) and issubclass(cls, Dictionary)):
        raise DictionaryError(f"architecture {name!r}: {cls!r} is not a Dictionary subclass")
    missing = [a for a in Dictionary.REQUIRED_KNOWLEDGE if not _declares(cls, a)]
    missing += [m for m in ("default_lr", "activation", "training_loss") if not _declares(cls, m)]
    if missing:
        raise DictionaryError(
            f"architecture {name!r} ({cls.__name__}) does not declare {', '.join(missing)}; every architecture "
            "states its own sparsity hyperparameter, run-name tag, loss terms, SAELens names and default LR "
            "(see lmscope.dictionaries.base.Dictionary)"
        )
    if cls.sparsity_param not in _CONFIG_FIELDS:
        raise DictionaryError(f"architecture {name!r}: sparsity_param {cls.sparsity_param!r} is not a DictConfig field")
    if cls.controlled_coeff is not None and cls.controlled_coeff not in _CONFIG_FIELDS:
        raise DictionaryError(
            f"architecture {name!r}: controlled_coeff {cls.controlled_coeff!r} is not a DictConfig field"
        )
    fields = {f for _text, f, _spec, _conv in string.Formatter().parse(cls.run_tag) if f is not None}
    if not fields <= _CONFIG_FIELDS:
        raise DictionaryError(f"architecture {name!r}: run_tag {cls.run_tag!r} names fields DictConfig lacks")
    if "mse" not in cls.loss_terms:
        raise DictionaryError(f"architecture {name!r}: loss_terms {cls.loss_terms!r} must include 'mse'")
    for alias in cls.saelens_imports:
        owner = next((a for a, c in _REGISTRY.items() if alias in c.saelens_imports), None)
        if owner is not None:
            raise DictionaryError(
                f"architecture {name!r}: SAELens architecture {alias!r} already loads as {owner!r}; one name, one owner"
            )


def register(name: str) -> Callable[[type[Dictionary]], type[Dictionary]]:
    """Class decorator: make an architecture available to `build`, the trainer, the CLI and the file formats.

    Raises DictionaryError when `name` is taken, or when the class does not declare its per-architecture
    knowledge (see `Dictionary`).
    """

    def deco(cls: type[Dictionary]) -> type[Dictionary]:
        if name in _REGISTRY:
            raise DictionaryError(
                f"dictionary architecture {name!r} is already registered (by {_REGISTRY[name].__module__}."
                f"{_REGISTRY[name].__qualname__}); register {cls.__qualname__} under another name"
            )
        _check_knowledge(name, cls)
        cls.arch = name
        _REGISTRY[name] = cls
        return cls

    return deco


def architectures(crosscoders: bool = False) -> list[str]:
    """Registered architectures; those made only for crosscoders are listed when `crosscoders` is set."""
    return [a for a, c in _REGISTRY.items() if crosscoders or not c.crosscoder_only]


def architecture(name: str) -> type[Dictionary]:
    """The registered class of an architecture."""
    try:
        return _REGISTRY[name]
    except KeyError:
        choices = ", ".join(_REGISTRY)
        raise DictionaryError(f"unknown dictionary architecture {name!r}; choose one of {choices}") from None


def build(cfg: DictConfig, seed: int | None = None) -> Dictionary:
    """A freshly initialised dictionary of the config's architecture (deterministic given `seed`)."""
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    d = architecture(cfg.arch)(cfg)
    if gen is not None:
        d.reset_parameters(gen)
    return d
