"""Ground truth in superposition: dictionaries must recover planted directions.

Activations are sparse non-negative combinations (5 active of n=512) of known unit directions in d=64
dimensions. Training that works recovers the directions: for each planted direction, the best-matching
decoder row has cosine close to 1. Broken training (wrong gradients, no decoder normalisation, a bad
schedule) leaves the mean max cosine far below the bar.
"""

from __future__ import annotations

import pytest
import torch

from lmscope.dictionaries import DictConfig, Dictionary, build, fvu
from lmscope.training import RunSpec, TensorSource, TrainConfig, Trainer

D_IN, N_FEATURES, ACTIVE = 64, 512, 5


PLANTED_SEED = 9_177  # not the trainer's init seed: with seed 0 the initial decoder WAS the planted directions


def planted(n_tokens: int = 60_000, seed: int = PLANTED_SEED) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    directions = torch.randn(N_FEATURES, D_IN, generator=g)
    directions = directions / directions.norm(dim=1, keepdim=True)
    idx = torch.randint(0, N_FEATURES, (n_tokens, ACTIVE), generator=g)
    coef = torch.rand(n_tokens, ACTIVE, generator=g) + 0.5
    x = torch.zeros(n_tokens, N_FEATURES).scatter_add_(1, idx, coef) @ directions
    return directions, x * 3.0 + 1.0  # an offset and a scale: b_dec and normalisation must handle them


def mean_max_cosine(directions: torch.Tensor, d: Dictionary) -> float:
    dec = d.decoder_directions.detach()
    dec = dec / dec.norm(dim=1, keepdim=True)
    return float((directions @ dec.T).max(dim=1).values.mean())


def train(cfg: DictConfig, x: torch.Tensor, steps: int, lr: float) -> Dictionary:
    tc = TrainConfig(total_tokens=steps * 1024, warmup_steps=20, dead_window_tokens=20_000, progress_bar=False, seed=0)
    out = Trainer([RunSpec(cfg, lr=lr)], tc).fit(TensorSource(x, batch_size=1024, epochs=20))
    return next(iter(out.values()))


CASES = {
    "topk": (DictConfig(arch="topk", d_in=D_IN, d_sae=N_FEATURES, k=ACTIVE), 1000, 4e-3, 0.95),
    "batchtopk": (DictConfig(arch="batchtopk", d_in=D_IN, d_sae=N_FEATURES, k=ACTIVE), 1000, 4e-3, 0.9),
    "matryoshka": (DictConfig(arch="matryoshka", d_in=D_IN, d_sae=N_FEATURES, k=ACTIVE), 1000, 4e-3, 0.8),
    "relu": (DictConfig(arch="relu", d_in=D_IN, d_sae=N_FEATURES, l1_coeff=2.0), 1000, 4e-3, 0.9),
    "jumprelu": (
        DictConfig(
            arch="jumprelu",
            d_in=D_IN,
            d_sae=N_FEATURES,
            k=ACTIVE,  # the TopK phase's k (the default 32 would train the phase far from this data's L0)
            l0_coeff=1.0,
            jumprelu_bandwidth=0.1,
            jumprelu_init_threshold=0.1,
        ),
        1000,
        4e-3,
        0.9,
    ),
}
# Steps: 1M tokens each. Measured with planted seed 9177 (quiet machine, before the TopK phases of BatchTopK, ReLU and
# JumpReLU): TopK 0.968, BatchTopK 0.944, ReLU 0.970,
# JumpReLU 0.936 (FVU 0.269; with l0_coeff 3 and bandwidth 0.2 it reached FVU 0.34). 100 steps gave TopK 0.535,
# barely above the untrained 0.5: the old test's 0.996 came from an initial decoder equal to the planted directions.
# Matryoshka (default groups) 0.854, FVU 0.322: these features are all equally frequent and have no hierarchy, so its
# first prefixes (32, then 64 latents), which must reconstruct alone, learn averaged directions (first group's latents
# 0.81 from any planted one) at a cost in reconstruction; hence its lower bars. Groups 1/4, 3/4 gave 0.898, FVU 0.284.


@pytest.mark.parametrize("arch", list(CASES))
def test_recovers_planted_directions(arch: str) -> None:
    directions, x = planted()
    cfg, steps, lr, bar = CASES[arch]
    start = mean_max_cosine(directions, build(cfg, seed=0))  # the trainer's initial weights (TrainConfig seed 0)
    assert start < 0.6, f"{arch}: the initial dictionary already scores {start:.3f}: the test would not need training"
    d = train(cfg, x, steps, lr)
    score = mean_max_cosine(directions, d)
    assert score >= bar, f"{arch}: mean max cosine {score:.3f} < {bar}"
    with torch.no_grad():
        recon, z = d(x[:4096])  # the returned dictionary takes raw (unnormalised) activations
    l0 = float((z > 0).float().sum(-1).mean())
    # ReLU + L1 keeps a tail of small activations and shrinks the large ones: a looser bound for it
    l0_max, fvu_max = {"relu": (40, 0.5), "matryoshka": (20, 0.4)}.get(arch, (20, 0.3))
    assert 2 <= l0 <= l0_max, f"{arch}: L0 {l0:.1f} is not sparse"
    assert float(fvu(x[:4096], recon)) < fvu_max


def test_untrained_dictionary_fails_the_bar() -> None:
    """The metric is discriminative: a random dictionary scores far below the bar."""
    directions, _ = planted(n_tokens=10)
    from lmscope.dictionaries import build

    d = build(DictConfig(arch="topk", d_in=D_IN, d_sae=N_FEATURES, k=ACTIVE), seed=1)
    assert mean_max_cosine(directions, d) < 0.6
