"""A ground-truth generator: activations that are sparse sums of known feature directions, with the hard parts of
real activations planted on purpose, so a dictionary's recovery of the true features can be scored.

    x = Σ_i z_i s_i d_i + offset + noise        d_i: a unit direction in R^d, s_i its scale, z_i ≥ 0 its magnitude

- **Superposition**: n = ratio · d features in d dimensions (the benchmark covers ratios 2–10).
- **Power-law frequencies**: free feature i (by rank) fires with probability p_i = c · (i+1)^−alpha, capped at
  `max_freq`, with c solved so that `active` features fire per sample on average (children included).
- **Correlated and anti-correlated pairs**: the firing of the second feature of a pair is tied to the first through
  a Gaussian copula of correlation ±`correlation`, so both keep their power-law frequencies exactly.
- **Hierarchies**: a parent (a frequent feature) has `children` child features that fire only when it fires: when
  the parent fires, with probability `child_prob` exactly one of its children (uniformly chosen) fires too.
- **Magnitudes with offsets, and noise**: a firing feature's magnitude is `magnitude_offset + magnitude_spread · U`,
  U ~ U[0, 1); every sample carries a constant offset vector of norm `offset`, and Gaussian noise of expected norm
  `noise` (relative to one unit feature).
- **Sources**: `random` directions (uniform on the sphere), or `toy`: the columns of a trained toy model of
  superposition (lmscope.synthetic.toy) with n features in d hidden dimensions; x is then the toy model's hidden
  activation W z. Features the toy model does not represent (‖W_i‖ < 0.5) are not scored.

Feature order: the free and parent features come first, by frequency rank (0 most frequent); children are the last
`hierarchies · children` features.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lmscope.core.progress import ProgressCallback
from lmscope.synthetic.errors import GroundTruthError
from lmscope.synthetic.toy import REPRESENTED_NORM, ToyConfig, ToySetting, train_toy

SOURCES = ("random", "toy")
MAX_FEATURES = 1 << 20


@dataclass
class GroundTruthConfig:
    """What the generator plants. Every field has a range; a config outside it raises GroundTruthError."""

    d: int = 64  # dimension of the activations
    ratio: float = 4.0  # n_features / d: the superposition ratio
    active: float = 4.0  # mean number of active features per sample (the truth's L0)
    alpha: float = 1.0  # power-law exponent of the frequencies (0: every free feature equally frequent)
    max_freq: float = 0.5  # no feature fires more often than this
    hierarchies: int = 0  # parent features, each with `children` children that fire only with it
    children: int = 2
    child_prob: float = 0.5  # P(one of its children fires | the parent fires)
    correlated_pairs: int = 0  # pairs of features whose firing is positively correlated
    anticorrelated_pairs: int = 0  # pairs whose firing is negatively correlated
    correlation: float = 0.7  # the copula correlation of a pair (the sign is the pair's)
    magnitude_offset: float = 0.5  # a firing feature's magnitude is offset + spread · U[0, 1)
    magnitude_spread: float = 1.0
    offset: float = 0.0  # norm of a constant vector added to every sample
    noise: float = 0.0  # expected norm of the Gaussian noise added to every sample
    source: str = "random"  # "random" directions or "toy" (a trained toy model's columns)
    toy_steps: int = 1000  # source "toy": training steps of the toy model
    seed: int = 0

    def __post_init__(self) -> None:
        self._check()

    @property
    def n_features(self) -> int:
        return max(1, round(self.ratio * self.d))

    @property
    def n_children(self) -> int:
        return self.hierarchies * self.children

    @property
    def n_base(self) -> int:
        """Free and parent features (everything but the children)."""
        return self.n_features - self.n_children

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def _check(self) -> None:
        def bad(problem: str, fix: str) -> GroundTruthError:
            return GroundTruthError(f"ground truth: {problem}; {fix}")

        if not 1 <= self.d <= 1 << 16:
            raise bad(f"d={self.d} is out of range", "use a dimension in [1, 65536]")
        if not (self.ratio > 0 and math.isfinite(self.ratio)) or not 2 <= self.n_features <= MAX_FEATURES:
            raise bad(f"ratio={self.ratio} gives {self.n_features} features", "pick a ratio giving 2 to 2^20 features")
        if not (self.active > 0 and math.isfinite(self.active)):
            raise bad(f"active={self.active} features per sample", "it must be positive")
        if self.active >= self.d:
            raise bad(
                f"active={self.active:g} features per sample in d={self.d} dimensions is more active features than "
                "the dimension allows (sparse recovery needs active < d)",
                f"lower active below {self.d} or raise d",
            )
        if not (0 <= self.alpha <= 10):
            raise bad(f"alpha={self.alpha} is out of range", "use a power-law exponent in [0, 10]")
        if not (0 < self.max_freq <= 1):
            raise bad(f"max_freq={self.max_freq} is out of range", "use a probability in (0, 1]")
        for name in ("hierarchies", "correlated_pairs", "anticorrelated_pairs"):
            if getattr(self, name) < 0:
                raise bad(f"{name}={getattr(self, name)} is negative", "use 0 or more")
        if self.hierarchies and self.children < 1:
            raise bad(f"children={self.children} per hierarchy", "use at least 1 child per parent")
        if not 0 < self.child_prob <= 1:
            raise bad(f"child_prob={self.child_prob} is out of range", "use a probability in (0, 1]")
        if not 0 < self.correlation < 1:
            raise bad(
                f"correlation={self.correlation} is out of range", "use a magnitude in (0, 1); pairs carry the sign"
            )
        roles = self.hierarchies * (self.children + 1) + 2 * (self.correlated_pairs + self.anticorrelated_pairs)
        if roles > self.n_features:
            raise bad(
                f"{self.hierarchies} hierarchies of {self.children} children and "
                f"{self.correlated_pairs + self.anticorrelated_pairs} pairs need {roles} features but there are "
                f"{self.n_features}",
                "plant fewer structures or raise ratio or d",
            )
        if self.magnitude_offset < 0 or self.magnitude_spread < 0 or self.magnitude_offset + self.magnitude_spread <= 0:
            raise bad(
                f"magnitudes offset={self.magnitude_offset}, spread={self.magnitude_spread}",
                "both must be >= 0 and not both 0",
            )
        if self.offset < 0 or self.noise < 0:
            raise bad(f"offset={self.offset}, noise={self.noise}", "both are norms and must be >= 0")
        if self.source not in SOURCES:
            raise bad(f"unknown source {self.source!r}", f"use one of {', '.join(SOURCES)}")
        if self.source == "toy" and self.n_features < self.d:
            raise bad(f"source toy with ratio={self.ratio} < 1", "a toy model needs ratio >= 1 (n features >= d)")
        if self.toy_steps < 1:
            raise bad(f"toy_steps={self.toy_steps}", "use a positive number of steps")
        _solve_frequencies(self)  # raises when `active` cannot be reached


@dataclass
class Samples:
    """Generated activations x [N, d] and the true feature magnitudes z [N, n] that made them."""

    x: Tensor
    z: Tensor

    def __len__(self) -> int:
        return int(self.x.shape[0])


@dataclass
class GroundTruth:
    """The planted features and their statistics; `sample` draws activations from them."""

    config: GroundTruthConfig
    directions: Tensor  # [n, d]: unit rows (zero rows for toy features the toy model does not represent)
    scales: Tensor  # [n]: the norm each feature is written with (1 for random directions)
    freq: Tensor  # [n]: each feature's firing probability (expected)
    parent: Tensor  # [n] long: the parent of a child feature, −1 for the others
    pairs: list[tuple[int, int, int]]  # (a, b, sign): b's firing correlates with a's with that sign
    bias: Tensor  # [d]: the constant offset vector
    scorable: Tensor  # [n] bool: features a dictionary can be scored on
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def n_features(self) -> int:
        return int(self.directions.shape[0])

    @property
    def d(self) -> int:
        return int(self.directions.shape[1])

    def parents(self) -> list[int]:
        return sorted({int(p) for p in self.parent.tolist() if p >= 0})

    def children_of(self, parent: int) -> list[int]:
        return [int(i) for i in (self.parent == parent).nonzero().flatten()]

    def decode(self, z: Tensor) -> Tensor:
        """The noiseless activation of true magnitudes z [N, n]."""
        return (z * self.scales) @ self.directions + self.bias

    def expected_l0(self) -> float:
        return float(self.freq.sum())

    def sample(self, n_samples: int, seed: int = 0, chunk: int = 16384) -> Samples:
        """n_samples activations and their true magnitudes (z is dense [N, n]; keep N modest). The same seed and
        chunk give the same samples, and `activations` (same seed and chunk) the same x."""
        xs, zs = [], []
        g = stream(seed, 1)
        for start in range(0, n_samples, chunk):
            z = self._magnitudes(min(chunk, n_samples - start), g)
            xs.append(self._activations(z, g))
            zs.append(z)
        return Samples(torch.cat(xs), torch.cat(zs))

    def activations(self, n_samples: int, seed: int = 0, chunk: int = 16384) -> Tensor:
        """n_samples activations only (what a dictionary trains on); the magnitudes are not kept."""
        g = stream(seed, 1)
        out = torch.empty(n_samples, self.d)
        for start in range(0, n_samples, chunk):
            size = min(chunk, n_samples - start)
            out[start : start + size] = self._activations(self._magnitudes(size, g), g)
        return out

    def _magnitudes(self, size: int, g: torch.Generator) -> Tensor:
        c = self.config
        nb = c.n_base
        u = torch.rand(size, nb, generator=g)
        for a, b, sign in self.pairs:  # Gaussian copula: b's uniform follows a's, the marginals stay uniform
            ga = torch.special.ndtri(u[:, a].clamp(1e-7, 1 - 1e-7))
            e = torch.randn(size, generator=g)
            u[:, b] = torch.special.ndtr(sign * c.correlation * ga + math.sqrt(1 - c.correlation**2) * e)
        fire = torch.zeros(size, self.n_features, dtype=torch.bool)
        fire[:, :nb] = u < self.freq[:nb]
        if c.hierarchies:
            parents = torch.tensor(self.parents())
            kids = torch.stack([torch.tensor(self.children_of(p)) for p in self.parents()])  # [h, children]
            with_child = fire[:, parents] & (torch.rand(size, len(parents), generator=g) < c.child_prob)
            which = torch.randint(0, c.children, (size, len(parents)), generator=g)
            one_hot = torch.nn.functional.one_hot(which, c.children).bool() & with_child[..., None]
            fire[:, kids.flatten()] = one_hot.reshape(size, -1)
        mags = c.magnitude_offset + c.magnitude_spread * torch.rand(size, self.n_features, generator=g)
        return torch.where(fire, mags, torch.zeros(()))

    def _activations(self, z: Tensor, g: torch.Generator) -> Tensor:
        x = self.decode(z)
        if self.config.noise:
            x = x + torch.randn(x.shape, generator=g) * (self.config.noise / math.sqrt(self.d))
        return x

    def describe(self) -> dict[str, Any]:
        """JSON-ready: the config and the realised statistics of the truth."""
        return {
            "config": self.config.to_dict(),
            "n_features": self.n_features,
            "scorable": int(self.scorable.sum()),
            "expected_l0": self.expected_l0(),
            "freq_max": float(self.freq.max()),
            "freq_min": float(self.freq.min()),
            "parents": self.parents(),
            "pairs": [list(p) for p in self.pairs],
            **self.extra,
        }


def stream(seed: int, purpose: int) -> torch.Generator:
    """A generator for one purpose (directions, training samples, …), decorrelated from `manual_seed(seed)`.

    A plain `manual_seed(seed)` would draw the same Gaussians as a dictionary initialised with the same seed
    (`lmscope.dictionaries.build(cfg, seed)`): with as many latents as true features, its decoder would start at the
    truth and "recover" it without training. Every stream of the generator is salted to rule that out.
    """
    return torch.Generator().manual_seed((seed * 0x9E3779B97F4A7C15 + purpose * 0xBF58476D1CE4E5B9 + 0x5EED) % 2**63)


def _base_weights(cfg: GroundTruthConfig) -> Tensor:
    return (torch.arange(cfg.n_base, dtype=torch.float64) + 1).pow(-cfg.alpha)


def _parent_ranks(cfg: GroundTruthConfig) -> list[int]:
    """Parents are frequent features: ranks 0, 2, 4, … (their neighbours stay free)."""
    step = 2 if 2 * cfg.hierarchies <= cfg.n_base else 1
    return [step * i for i in range(cfg.hierarchies)]


def _solve_frequencies(cfg: GroundTruthConfig) -> Tensor:
    """[n_base] firing probabilities p_i = min(max_freq, c·(i+1)^−alpha) with expected L0 (children too) = active."""
    w = _base_weights(cfg)
    parents = torch.tensor(_parent_ranks(cfg), dtype=torch.long)

    def expected(c: float) -> tuple[Tensor, float]:
        p = (c * w).clamp(max=cfg.max_freq)
        return p, float(p.sum() + (p[parents].sum() * cfg.child_prob if len(parents) else 0.0))

    top = expected(float("inf"))[1]
    if top < cfg.active - 1e-9:
        raise GroundTruthError(
            f"ground truth: active={cfg.active:g} features per sample cannot be generated: {cfg.n_features} features "
            f"firing at most max_freq={cfg.max_freq:g} give at most {top:.3g}; lower active or raise max_freq or ratio"
        )
    lo, hi = 0.0, 1.0
    while expected(hi)[1] < cfg.active:
        hi *= 2.0
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if expected(mid)[1] < cfg.active else (lo, mid)
    return expected(hi)[0].float()


def generate(
    cfg: GroundTruthConfig, progress: ProgressCallback | None = None, device: str | torch.device = "cpu"
) -> GroundTruth:
    """Plant the features of `cfg`: directions, frequencies, hierarchies and pairs (seeded by cfg.seed)."""
    n, nb, d = cfg.n_features, cfg.n_base, cfg.d
    g = stream(cfg.seed, 0)
    base_freq = _solve_frequencies(cfg)
    parents = _parent_ranks(cfg)
    parent = torch.full((n,), -1, dtype=torch.long)
    freq = torch.zeros(n)
    freq[:nb] = base_freq
    for h, p in enumerate(parents):
        kids = range(nb + h * cfg.children, nb + (h + 1) * cfg.children)
        parent[list(kids)] = p
        freq[list(kids)] = base_freq[p] * cfg.child_prob / cfg.children
    free = [i for i in range(nb) if i not in set(parents)]
    pairs: list[tuple[int, int, int]] = []
    signs = [1] * cfg.correlated_pairs + [-1] * cfg.anticorrelated_pairs
    for k, sign in enumerate(signs):  # consecutive free ranks: the two features of a pair are about as frequent
        pairs.append((free[2 * k], free[2 * k + 1], sign))
    extra: dict[str, Any] = {}
    if cfg.source == "toy":
        toy_seed = (cfg.seed * 0x9E3779B1 + 0x70E) % 2**31  # salted like `stream`: not a dictionary initialisation
        toy = ToyConfig(n_features=n, d_hidden=d, steps=cfg.toy_steps, restarts=1, eval_samples=1024, seed=toy_seed)
        sparsity = 1.0 - min(0.999, cfg.active / n)
        (model,) = train_toy(toy, [ToySetting.decaying(n, sparsity)], progress, device=device, task="toy source")
        W = model.W.T.contiguous()  # [n, d]
        scales = W.norm(dim=1)
        scorable = scales >= REPRESENTED_NORM
        directions = torch.where(scorable[:, None], W / scales.clamp_min(1e-12)[:, None], torch.zeros_like(W))
        extra = {"toy_loss": model.loss, "toy_represented": int(scorable.sum())}
    else:
        directions = torch.randn(n, d, generator=g)
        directions = directions / directions.norm(dim=1, keepdim=True)
        scales = torch.ones(n)
        scorable = torch.ones(n, dtype=torch.bool)
    bias = torch.randn(d, generator=g)
    bias = bias / bias.norm() * cfg.offset
    return GroundTruth(cfg, directions, scales, freq, parent, pairs, bias, scorable, extra)
