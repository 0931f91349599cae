"""The TopK phase: the first `DictConfig.token_topk_frac` of training selects each token's k largest pre-activations.

Dictionaries whose training sparsity comes from a batch-level selection (BatchTopK, Matryoshka) or a penalty
(JumpReLU, ReLU) leave many latents dead or recover few features when they start from random weights at high
superposition: on the ground-truth recovery benchmark at 10x, BatchTopK from its first step kept 41% of its latents
alive and JumpReLU about half, where TopK on the same samples keeps 80%, and an L1 ReLU recovered the fewest
features (docs/superposition.md). Starting with per-token TopK (the AuxK loss revives what dies) spreads the latents
over the features; the architecture's own selection then takes over for the rest of training, starting from a
threshold estimated during the phase, so a run stopped inside the phase still encodes with its architecture's
inference rule.

This module holds what those architectures share: whether a step is in the phase, the per-token selection and its
loss, and the threshold estimate (the batch-level cut of a sample of tokens, folded into a running mean, then an EMA).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch
from torch import Tensor

from lmscope.core import distributed
from lmscope.dictionaries.base import DictConfig, Dictionary, LossState
from lmscope.dictionaries.select import top_k
from lmscope.dictionaries.topk import aux_k_loss

THRESHOLD_MOMENTUM = 0.99
CUT_SAMPLE_TOKENS = 512  # the tokens whose batch-level cut estimates the threshold during the phase


def fraction(cfg: DictConfig) -> float:
    """The config's phase fraction (DictConfig resolves None to the architecture's default when it is built)."""
    return float(cfg.token_topk_frac or 0.0)


def in_phase(cfg: DictConfig, state: LossState) -> bool:
    return state.progress < fraction(cfg)


def ramp_state(cfg: DictConfig, state: LossState) -> LossState:
    """After the phase, the state the sparsity penalty's warmup ramp reads: progress counted from the phase's end,
    so the penalty ramps in then as it would from the start of a run without a phase."""
    frac = fraction(cfg)
    return dataclasses.replace(state, progress=max(0.0, state.progress - frac)) if frac > 0 else state


def phase_k(cfg: DictConfig) -> int:
    """How many latents each token keeps in the phase: the target L0 when one is set, else `k`."""
    k = round(cfg.target_l0) if cfg.target_l0 is not None else int(cfg.k)
    return max(1, min(int(cfg.d_sae), k))


def token_topk(pre: Tensor, k: int) -> Tensor:
    """Each token's k largest pre-activations (ReLU'd), dense [..., d_sae]; gradients flow to the kept ones."""
    vals, idx = top_k(pre, min(k, pre.shape[-1]))
    return torch.zeros_like(pre).scatter_(-1, idx, torch.relu(vals))


class PhaseStep(NamedTuple):
    pre: Tensor  # the pre-activations
    z: Tensor  # each token's top k of them (ReLU'd), dense
    recon: Tensor
    mse: Tensor
    aux: Tensor  # the AuxK loss of the dead latents (0 when none is dead)


def phase_step(d: Dictionary, x: Tensor, target: Tensor, state: LossState) -> PhaseStep:
    """A TopK-phase forward pass of `d`: each token keeps its top `phase_k`, reconstructed by the decoder, with the
    reconstruction's MSE and the AuxK loss that revives dead latents."""
    pre = d.pre_acts(x)
    z = token_topk(pre, phase_k(d.cfg))
    recon = d.with_skip(z @ d.W_dec + d.b_dec, x)
    return PhaseStep(pre, z, recon, d.mse(target, recon), aux_k_loss(d, x, target, recon, state.dead_mask))


def batch_topk(pre: Tensor, k: int) -> Tensor:
    """The k * n_tokens largest ReLU'd pre-activations across the batch (a token keeps any number), dense."""
    flat = torch.relu(pre).reshape(-1)
    n = min(k * pre.shape[0], flat.numel())
    vals, idx = flat.topk(n, sorted=False)
    return torch.zeros_like(flat).scatter_(0, idx, vals).reshape(pre.shape)


def just_ended(cfg: DictConfig, state: LossState) -> bool:
    """Whether this is the first step after the phase: this step is past it and the previous one was in it."""
    frac = fraction(cfg)
    return state.step >= 1 and (state.step - 1) / state.total_steps < frac <= state.step / state.total_steps


@torch.no_grad()
def batch_cut(pre: Tensor, k: int) -> Tensor | None:
    """The smallest activation a batch-level selection of k per token keeps, on the first CUT_SAMPLE_TOKENS tokens of
    the batch; None when it keeps nothing (every pre-activation <= 0).

    Under torchrun `pre` is this rank's contiguous slice of the global batch: the ranks holding the first
    CUT_SAMPLE_TOKENS global tokens each contribute their largest k * CUT_SAMPLE_TOKENS values (no more can be among
    the kept ones), so every rank gets exactly the cut one process would compute on the whole batch.
    """
    n_local = pre.shape[0]
    world = distributed.world_size()
    take = max(0, min(n_local, CUT_SAMPLE_TOKENS - distributed.rank() * n_local))
    n_sample = min(CUT_SAMPLE_TOKENS, n_local * world)
    keep = min(k * n_sample, n_sample * pre.shape[-1])
    local = torch.relu(pre[:take].detach()).reshape(-1)
    top = local.topk(min(keep, local.numel()), sorted=False).values
    if world > 1:  # pad to one size for the gather (zeros are never kept)
        top = distributed.all_gather_cat(torch.cat([top, top.new_zeros(keep - top.numel())]))
        top = top.topk(keep, sorted=False).values
    positive = top[top > 0]
    return positive.min() if positive.numel() else None


@torch.no_grad()
def fold(threshold: Tensor, low: Tensor, n: int) -> None:
    """Fold `low` into `threshold` (in place) as update number n: a running mean first, so early batches fade out,
    then an EMA with momentum THRESHOLD_MOMENTUM. A NaN threshold (never estimated) is replaced."""
    momentum = min(THRESHOLD_MOMENTUM, n / (n + 1))
    if bool(torch.isnan(threshold).any()):
        threshold.copy_(low.expand_as(threshold))
    else:
        threshold.mul_(momentum).add_((1 - momentum) * low)
