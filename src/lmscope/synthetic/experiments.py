"""The toy-model experiments of Elhage et al. 2022, each a config, a function and a JSON-ready result.

- `phase_diagram`: the relative importance of an extra feature × feature density → the extra feature is not
  represented, gets a dedicated dimension, or is stored in superposition (n=2 features in m=1 dimension by default).
- `dimensionality`: small polytopes trained to convergence (digon 1/2, triangle 2/3, pentagon 2/5) and a sweep of
  feature dimensionalities D_i over sparsity for a larger model, with the fractions they stick to.
- `transition`: n=20 features of decaying importance (0.7^i) in m=5 dimensions, as sparsity grows: from the m most
  important features each in a dedicated dimension, to most features represented in superposition.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from lmscope.core.progress import ProgressCallback
from lmscope.synthetic.errors import ToyConfigError
from lmscope.synthetic.toy import (
    NOT_REPRESENTED,
    REPRESENTED_NORM,
    SUPERPOSED,
    ToyConfig,
    ToyModel,
    ToySetting,
    dimensions_per_feature,
    train_toy,
)

# Known fractional dimensionalities (Elhage et al., "Feature dimensionality"): value -> geometry
FRACTIONS: dict[str, float] = {
    "dedicated": 1.0,
    "tetrahedron": 3 / 4,
    "triangle": 2 / 3,
    "digon": 1 / 2,
    "pentagon": 2 / 5,
    "square antiprism": 3 / 8,
}


def log_grid(start: float, stop: float, num: int) -> list[float]:
    if num == 1:
        return [float(start)]
    return [float(v) for v in torch.logspace(torch.log10(torch.tensor(start)), torch.log10(torch.tensor(stop)), num)]


def nearest_fraction(value: float) -> tuple[str, float]:
    """The known geometry whose dimensionality is closest to `value`."""
    name = min(FRACTIONS, key=lambda k: abs(FRACTIONS[k] - value))
    return name, FRACTIONS[name]


# ---------------------------------------------------------------------------------------------------- phase diagram
@dataclass
class PhaseConfig:
    """A grid of (relative importance of the last feature, feature density); the other features have importance 1."""

    toy: ToyConfig = field(default_factory=lambda: ToyConfig(n_features=2, d_hidden=1, restarts=8))
    grid: int = 8  # points per axis (an even count: the grid misses importance 1 exactly, a degenerate boundary)
    importance_range: tuple[float, float] = (0.1, 10.0)  # relative importance of the extra feature, log-spaced
    density_range: tuple[float, float] = (1.0, 0.01)  # 1 − S, log-spaced, from dense to sparse

    def __post_init__(self) -> None:
        if not 1 <= self.grid <= 64:
            raise ToyConfigError(f"phase diagram: grid={self.grid} is out of range; use 1 to 64 points per axis")
        lo, hi = self.importance_range
        if not (0 < lo <= hi):
            raise ToyConfigError(
                f"phase diagram: importance range {self.importance_range} is out of range; give 0 < low <= high"
            )
        d0, d1 = self.density_range
        if not (0 < d1 <= 1 and 0 < d0 <= 1):
            raise ToyConfigError(
                f"phase diagram: density range {self.density_range} is out of range; densities (1 − sparsity) must "
                "be in (0, 1]"
            )

    def importances(self) -> list[float]:
        return log_grid(*self.importance_range, self.grid)

    def densities(self) -> list[float]:
        return log_grid(*self.density_range, self.grid)


@dataclass
class PhaseDiagram:
    config: PhaseConfig
    importances: list[float]  # x axis: relative importance of the extra (last) feature
    densities: list[float]  # y axis: feature density 1 − S
    phase: list[list[str]]  # [density][importance]: the extra feature's phase
    models: list[list[ToyModel]]  # [density][importance]

    def to_dict(self) -> dict[str, Any]:
        return {
            "experiment": "phase_diagram",
            "config": {**dataclasses.asdict(self.config), "toy": self.config.toy.to_dict()},
            "importances": self.importances,
            "densities": self.densities,
            "phase": self.phase,
            "models": [[m.summary() for m in row] for row in self.models],
        }

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for row in self.phase:
            for p in row:
                out[p] = out.get(p, 0) + 1
        return out


def phase_diagram(
    cfg: PhaseConfig, progress: ProgressCallback | None = None, device: str | torch.device = "cpu"
) -> PhaseDiagram:
    """Train one toy model per grid point and classify the extra (last) feature."""
    n = cfg.toy.n_features
    if n < 2:
        raise ToyConfigError("phase diagram: needs n_features >= 2 (an extra feature beside the others)")
    imps, dens = cfg.importances(), cfg.densities()
    settings = [ToySetting(1.0 - d, (1.0,) * (n - 1) + (r,)) for d in dens for r in imps]
    models = train_toy(cfg.toy, settings, progress, device, task="phase diagram")
    grid = [models[i * len(imps) : (i + 1) * len(imps)] for i in range(len(dens))]
    return PhaseDiagram(cfg, imps, dens, [[m.phases()[-1] for m in row] for row in grid], grid)


# ---------------------------------------------------------------------------------------------------- dimensionality
@dataclass(frozen=True)
class Polytope:
    """A small model whose features, sparse enough, settle into a known polytope."""

    name: str
    n_features: int
    d_hidden: int
    sparsity: float
    expected: float  # the dimensionality of each of its features


POLYTOPES: tuple[Polytope, ...] = (
    Polytope("digon", 2, 1, 0.95, 1 / 2),  # two antipodal features share one dimension
    # moderate sparsity: the best of 24 restarts is the triangle (sparser, training settles in a digon + a dedicated
    # feature; nearby, S = 0.3, most restarts end in a distorted triangle of higher loss)
    Polytope("triangle", 3, 2, 0.4, 2 / 3),
    Polytope("pentagon", 5, 2, 0.95, 2 / 5),
)


@dataclass
class DimsConfig:
    """Training knobs for the polytopes, and a sparsity sweep of a larger model."""

    toy: ToyConfig = field(default_factory=lambda: ToyConfig(n_features=12, d_hidden=4, restarts=6))
    polytopes: tuple[Polytope, ...] = POLYTOPES
    polytope_restarts: int = 24  # the polytopes are tiny: many restarts find the global optimum reliably
    sweep_densities: tuple[float, ...] = tuple(log_grid(1.0, 0.01, 8))  # of the sweep model (toy's n and m)

    def __post_init__(self) -> None:
        for p in self.polytopes:
            if not 1 <= p.d_hidden <= p.n_features:
                raise ToyConfigError(f"dimensionality: polytope {p.name} needs 1 <= d_hidden <= n_features")
        for d in self.sweep_densities:
            if not 0 < d <= 1:
                raise ToyConfigError(
                    f"dimensionality: sweep density {d} is out of range; densities (1 − sparsity) must be in (0, 1]"
                )


@dataclass
class PolytopeResult:
    polytope: Polytope
    model: ToyModel
    mean_dimensionality: float  # over the represented features
    represented: int
    nearest: str  # the known geometry closest to the mean

    def to_dict(self) -> dict[str, Any]:
        return {
            **dataclasses.asdict(self.polytope),
            "mean_dimensionality": self.mean_dimensionality,
            "represented": self.represented,
            "nearest": self.nearest,
            "model": self.model.summary(),
        }


@dataclass
class Dimensionality:
    config: DimsConfig
    polytopes: list[PolytopeResult]
    sweep: list[ToyModel]  # one per sweep density

    def to_dict(self) -> dict[str, Any]:
        sweep = []
        for m in self.sweep:
            d = m.dimensionality()
            rep = m.norms() >= REPRESENTED_NORM
            sweep.append(
                {
                    "density": 1.0 - m.setting.sparsity,
                    "dims_per_feature": dimensions_per_feature(m.W),
                    "represented": int(rep.sum()),
                    "dimensionality": [round(float(v), 4) for v in d[rep]],
                    "model": m.summary(),
                }
            )
        return {
            "experiment": "dimensionality",
            "fractions": FRACTIONS,
            "polytopes": [p.to_dict() for p in self.polytopes],
            "sweep": {"n_features": self.config.toy.n_features, "d_hidden": self.config.toy.d_hidden, "points": sweep},
        }


def _polytope_result(p: Polytope, model: ToyModel) -> PolytopeResult:
    rep = model.norms() >= REPRESENTED_NORM
    mean = float(model.dimensionality()[rep].mean()) if bool(rep.any()) else 0.0
    return PolytopeResult(p, model, mean, int(rep.sum()), nearest_fraction(mean)[0])


def dimensionality(
    cfg: DimsConfig, progress: ProgressCallback | None = None, device: str | torch.device = "cpu"
) -> Dimensionality:
    """Train the polytopes (uniform importance) and the sparsity sweep; measure each feature's D_i."""
    results = []
    for p in cfg.polytopes:
        toy = dataclasses.replace(
            cfg.toy, n_features=p.n_features, d_hidden=p.d_hidden, restarts=cfg.polytope_restarts
        )
        (model,) = train_toy(toy, [ToySetting.decaying(p.n_features, p.sparsity)], progress, device, task=p.name)
        results.append(_polytope_result(p, model))
    n = cfg.toy.n_features
    sweep = []
    if cfg.sweep_densities:
        settings = [ToySetting.decaying(n, 1.0 - d) for d in cfg.sweep_densities]
        sweep = train_toy(cfg.toy, settings, progress, device, task=f"sweep {n} in {cfg.toy.d_hidden}")
    return Dimensionality(cfg, results, sweep)


# ---------------------------------------------------------------------------------------------------- transition
@dataclass
class TransitionConfig:
    toy: ToyConfig = field(default_factory=lambda: ToyConfig(n_features=20, d_hidden=5, steps=3000))
    importance_decay: float = 0.7  # feature i has importance decay**i
    sparsities: tuple[float, ...] = (0.0, 0.7, 0.9, 0.97, 0.99, 0.997)

    def __post_init__(self) -> None:
        if not 0 < self.importance_decay <= 1:
            raise ToyConfigError(
                f"transition: importance_decay={self.importance_decay} is out of range; it must be in (0, 1]"
            )
        if not self.sparsities:
            raise ToyConfigError("transition: no sparsities; give at least one in [0, 1)")


@dataclass
class Transition:
    config: TransitionConfig
    models: list[ToyModel]  # one per sparsity

    def represented(self) -> list[int]:
        return [sum(p != NOT_REPRESENTED for p in m.phases()) for m in self.models]

    def superposed(self) -> list[int]:
        return [sum(p == SUPERPOSED for p in m.phases()) for m in self.models]

    def to_dict(self) -> dict[str, Any]:
        return {
            "experiment": "transition",
            "config": {**dataclasses.asdict(self.config), "toy": self.config.toy.to_dict()},
            "sparsities": list(self.config.sparsities),
            "represented": self.represented(),
            "superposed": self.superposed(),
            "dims_per_feature": [dimensions_per_feature(m.W) for m in self.models],
            "models": [m.summary() for m in self.models],
            "gram": [[[round(float(v), 4) for v in row] for row in (m.W.T @ m.W)] for m in self.models],
        }


def transition(
    cfg: TransitionConfig, progress: ProgressCallback | None = None, device: str | torch.device = "cpu"
) -> Transition:
    """Train the same model at each sparsity; count represented and superposed features."""
    n = cfg.toy.n_features
    settings = [ToySetting.decaying(n, s, cfg.importance_decay) for s in cfg.sparsities]
    return Transition(cfg, train_toy(cfg.toy, settings, progress, device, task="transition"))
