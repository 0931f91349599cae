"""Toy models of superposition (Elhage et al. 2022): `x' = ReLU(WᵀW x + b)` on sparse synthetic features.

n features x ∈ [0, 1]^n, each zero with probability S (the sparsity) and uniform on [0, 1) otherwise, are squeezed
through m < n hidden dimensions (h = W x, W [m, n]) and read back with a ReLU: x' = ReLU(Wᵀ h + b). The loss weighs
each feature's squared error by its importance I_i: L = E Σ_i I_i (x_i − x'_i)².

Many models ("instances") train at once as one batched tensor, each with its own sparsity and importances
(a `ToySetting`); each setting trains `restarts` times from different initialisations and the run with the lowest
held-out loss is kept (toy models do fall into local minima; the paper keeps the best of several too).

The analyses read the geometry of W's columns W_i:
- `feature_norms`: ‖W_i‖ (≈ 1 represented, ≈ 0 not represented);
- `superposition`: Σ_{j≠i} (Ŵ_i·W_j)², how much other features share feature i's direction;
- `dimensionality`: D_i = ‖W_i‖² / Σ_j (Ŵ_i·W_j)², the fraction of a dimension feature i owns (1 dedicated,
  1/2 a digon's antipodal pair, 2/3 a triangle, 2/5 a pentagon, …);
- `phases`: "not represented", "dedicated" or "superposed" per feature.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

from lmscope.core.progress import ProgressCallback, ProgressEvent, emit
from lmscope.synthetic.errors import ToyConfigError

NOT_REPRESENTED, DEDICATED, SUPERPOSED = "not represented", "dedicated", "superposed"
PHASES = (NOT_REPRESENTED, DEDICATED, SUPERPOSED)
REPRESENTED_NORM = 0.5  # ‖W_i‖ above this: the feature is represented
INTERFERENCE = 0.1  # Σ_{j≠i} (Ŵ_i·W_j)² above this: a represented feature shares its direction (superposed)
MAX_FEATURES = 4096  # a toy model is small; beyond this use the ground-truth generator (lmscope.synthetic.data)


@dataclass
class ToyConfig:
    """The shape of the toy models and how they train (every setting of a batch shares these)."""

    n_features: int = 5  # n: sparse input features
    d_hidden: int = 2  # m: hidden dimensions (m ≤ n)
    steps: int = 2000  # AdamW steps
    batch_size: int = 1024  # samples per step and per model
    lr: float = 1e-2  # peak learning rate; cosine decay to 0 over `steps`
    weight_decay: float = 0.01  # AdamW's default, as in the paper's code
    restarts: int = 3  # initialisations per setting; the lowest held-out loss is kept
    eval_samples: int = 65536  # held-out samples that pick the best restart (the same for every restart)
    seed: int = 0

    def __post_init__(self) -> None:
        checks: list[tuple[str, bool, str]] = [
            ("n_features", 1 <= self.n_features <= MAX_FEATURES, f"an integer in [1, {MAX_FEATURES}]"),
            ("d_hidden", 1 <= self.d_hidden <= self.n_features, f"an integer in [1, n_features={self.n_features}]"),
            ("steps", self.steps >= 1, "a positive integer"),
            ("batch_size", self.batch_size >= 1, "a positive integer"),
            ("lr", 0 < self.lr <= 1, "in (0, 1]"),
            ("weight_decay", 0 <= self.weight_decay < 1, "in [0, 1)"),
            ("restarts", self.restarts >= 1, "a positive integer"),
            ("eval_samples", self.eval_samples >= 1, "a positive integer"),
        ]
        for name, ok, want in checks:
            if not ok:
                raise ToyConfigError(f"toy model: {name}={getattr(self, name)} is out of range; it must be {want}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ToySetting:
    """What one toy model sees: the sparsity S of every feature and each feature's importance."""

    sparsity: float  # S: the probability that a feature is zero, in [0, 1)
    importance: tuple[float, ...]  # I_i > 0, one per feature

    def check(self, n_features: int) -> None:
        if not (0.0 <= self.sparsity < 1.0) or math.isnan(self.sparsity):
            raise ToyConfigError(
                f"toy model: sparsity={self.sparsity} is out of range; it must be in [0, 1) (1 would never show a "
                "feature; use e.g. 0.99)"
            )
        if len(self.importance) != n_features:
            raise ToyConfigError(
                f"toy model: {len(self.importance)} importances for {n_features} features; give one per feature"
            )
        bad = [v for v in self.importance if not (v > 0 and math.isfinite(v))]
        if bad:
            raise ToyConfigError(f"toy model: importance {bad[0]} is out of range; importances must be positive")

    @classmethod
    def decaying(cls, n_features: int, sparsity: float, decay: float = 1.0) -> ToySetting:
        """Importance decay**i (1: uniform; the paper's 0.7 or 0.9 make earlier features more important)."""
        if not (0 < decay <= 1):
            raise ToyConfigError(f"toy model: importance decay={decay} is out of range; it must be in (0, 1]")
        return cls(sparsity, tuple(float(decay**i) for i in range(n_features)))


@dataclass
class ToyModel:
    """One trained toy model (the best of its restarts)."""

    setting: ToySetting
    W: Tensor  # [m, n]: column i is feature i's hidden direction
    b: Tensor  # [n]
    loss: float  # held-out importance-weighted loss
    restart_losses: list[float] = field(default_factory=list)

    def norms(self) -> Tensor:
        return feature_norms(self.W)

    def superposition(self) -> Tensor:
        return superposition(self.W)

    def dimensionality(self) -> Tensor:
        return dimensionality(self.W)

    def phases(self) -> list[str]:
        return phases(self.W)

    def summary(self) -> dict[str, Any]:
        """JSON-ready figures of this model."""
        return {
            "sparsity": self.setting.sparsity,
            "importance": list(self.setting.importance),
            "loss": self.loss,
            "restart_losses": self.restart_losses,
            "norms": _floats(self.norms()),
            "superposition": _floats(self.superposition()),
            "dimensionality": _floats(self.dimensionality()),
            "phases": self.phases(),
            "dims_per_feature": dimensions_per_feature(self.W),
            "W": [_floats(row) for row in self.W],
            "b": _floats(self.b),
        }


def _floats(t: Tensor) -> list[float]:
    return [float(f"{float(v):.6g}") for v in t.flatten()]


# ---------------------------------------------------------------------------------------------------- analyses
def feature_norms(W: Tensor) -> Tensor:
    """‖W_i‖ for every feature (W [m, n])."""
    return W.norm(dim=0)


def overlaps(W: Tensor) -> Tensor:
    """[n, n]: entry (i, j) is Ŵ_i·W_j, feature j's component along feature i's unit direction."""
    unit = W / feature_norms(W).clamp_min(1e-12)
    return unit.T @ W


def superposition(W: Tensor) -> Tensor:
    """Σ_{j≠i} (Ŵ_i·W_j)²: how much the other features load on feature i's direction."""
    sq = overlaps(W).pow(2)
    return sq.sum(1) - sq.diagonal()


def dimensionality(W: Tensor) -> Tensor:
    """D_i = ‖W_i‖² / Σ_j (Ŵ_i·W_j)²: 1 for a dedicated dimension, 1/2 digon, 2/3 triangle, 2/5 pentagon; 0 unused."""
    n2 = feature_norms(W).pow(2)
    denom = overlaps(W).pow(2).sum(1)
    return torch.where(denom > 1e-12, n2 / denom.clamp_min(1e-12), torch.zeros_like(n2))


def dimensions_per_feature(W: Tensor) -> float:
    """m / ‖W‖_F²: hidden dimensions per represented feature (1 without superposition, below 1 with it)."""
    total = float(W.pow(2).sum())
    return W.shape[0] / total if total > 0 else float("inf")


def phases(W: Tensor, represented: float = REPRESENTED_NORM, interference: float = INTERFERENCE) -> list[str]:
    """Each feature's phase: not represented (‖W_i‖ small), dedicated (alone on its direction) or superposed."""
    norms, sup = feature_norms(W), superposition(W)
    out = []
    for nrm, s in zip(norms.tolist(), sup.tolist(), strict=True):
        out.append(NOT_REPRESENTED if nrm < represented else SUPERPOSED if s > interference else DEDICATED)
    return out


# ---------------------------------------------------------------------------------------------------- training
def _features(u: Tensor, density: Tensor) -> Tensor:
    """Sparse features from uniforms u: nonzero with probability `density`, then uniform on [0, 1)."""
    return torch.where(u < density, u / density, torch.zeros_like(u))


def _forward(W: Tensor, b: Tensor, x: Tensor) -> Tensor:
    """x [I, B, n] -> ReLU(Wᵀ W x + b), batched over the instances."""
    return torch.relu(torch.bmm(torch.bmm(x, W.transpose(1, 2)), W) + b[:, None, :])


def _loss(W: Tensor, b: Tensor, x: Tensor, importance: Tensor) -> Tensor:
    """[I]: each instance's importance-weighted squared error, mean over the batch and summed over features."""
    return (importance * (x - _forward(W, b, x)).pow(2)).mean(1).sum(-1)


def train_toy(
    cfg: ToyConfig,
    settings: Sequence[ToySetting],
    progress: ProgressCallback | None = None,
    device: str | torch.device = "cpu",
    task: str = "toy",
) -> list[ToyModel]:
    """Train one toy model per setting (each the best of `cfg.restarts` runs), all in one batched loop."""
    if not settings:
        raise ToyConfigError("toy model: no settings to train; give at least one (sparsity, importance)")
    for s in settings:
        s.check(cfg.n_features)
    dev = torch.device(device)
    n, m, r = cfg.n_features, cfg.d_hidden, cfg.restarts
    n_inst = len(settings) * r  # instance k is setting k // r, restart k % r
    g = torch.Generator(device="cpu").manual_seed(cfg.seed)
    W = (torch.randn(n_inst, m, n, generator=g) * math.sqrt(2.0 / (m + n))).to(dev).requires_grad_(True)  # xavier
    b = torch.zeros(n_inst, n, device=dev, requires_grad=True)
    density = torch.tensor([1.0 - s.sparsity for s in settings], device=dev).repeat_interleave(r)[:, None, None]
    importance = torch.tensor([s.importance for s in settings], device=dev).repeat_interleave(r, 0)[:, None, :]
    opt = torch.optim.AdamW([W, b], lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator(device=dev).manual_seed(cfg.seed + 1)
    every = max(1, cfg.steps // 100)
    emit(progress, ProgressEvent(task, 0, cfg.steps, "steps"))
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = cfg.lr * 0.5 * (1.0 + math.cos(math.pi * step / cfg.steps))
        x = _features(torch.rand(n_inst, cfg.batch_size, n, generator=gen, device=dev), density)
        loss = _loss(W, b, x, importance)
        opt.zero_grad(set_to_none=True)
        loss.sum().backward()
        opt.step()
        if (step + 1) % every == 0 or step + 1 == cfg.steps:
            mean = float(loss.detach().mean())
            emit(
                progress,
                ProgressEvent(
                    task, step + 1, cfg.steps, "steps", f"loss {mean:.5f}", step + 1 == cfg.steps, {"loss": mean}
                ),
            )
    held_out = _held_out_losses(W.detach(), b.detach(), settings, cfg, dev)
    out = []
    for k, s in enumerate(settings):
        losses = held_out[k * r : (k + 1) * r]
        best = k * r + int(torch.argmin(losses))
        out.append(ToyModel(s, W[best].detach().cpu(), b[best].detach().cpu(), float(held_out[best]), _floats(losses)))
    return out


@torch.no_grad()
def _held_out_losses(W: Tensor, b: Tensor, settings: Sequence[ToySetting], cfg: ToyConfig, dev: torch.device) -> Tensor:
    """[instances]: the loss on held-out samples, the same samples for every restart of a setting (a paired test)."""
    r, n = cfg.restarts, cfg.n_features
    gen = torch.Generator(device=dev).manual_seed(cfg.seed + 2)
    density = torch.tensor([1.0 - s.sparsity for s in settings], device=dev)[:, None, None]
    importance = torch.tensor([s.importance for s in settings], device=dev)[:, None, :]
    total = torch.zeros(len(settings) * r, device=dev, dtype=torch.float64)
    chunk = 4096
    done = 0
    while done < cfg.eval_samples:
        size = min(chunk, cfg.eval_samples - done)
        x = _features(torch.rand(len(settings), size, n, generator=gen, device=dev), density)
        x = x.repeat_interleave(r, 0)
        total += _loss(W, b, x, importance.repeat_interleave(r, 0)).double() * size
        done += size
    return (total / cfg.eval_samples).float().cpu()
