"""Matryoshka BatchTopK dictionary (Bussmann et al. 2025; Nabeshima 2024): nested prefixes that each reconstruct.

The latents are split into consecutive groups; prefix i is groups 0..i (the first m_i latents). Selection is
BatchTopK's (the k * batch largest activations of the batch), and the loss sums the reconstruction error of every
prefix, each decoded from its own latents only, plus BatchTopK's AuxK term:

    loss = sum_i |x - (z[:, :m_i] @ W_dec[:m_i] + b_dec)|^2 + aux_coeff * AuxK        (m_last = d_sae)

The first latents must reconstruct on their own, so a general feature (a parent) cannot hand its direction to
its more specific children: that is what reduces feature absorption, and why the early latents end up the
frequent, general ones. Inference is BatchTopK's: one saved threshold (`pre > threshold`).

`matryoshka_groups` gives the group sizes as fractions of d_sae (summing to 1) or latent counts (summing to
d_sae); empty means 1/16, 1/16, 1/8, 1/4, 1/2 (the prefixes end at 1/16, 1/8, 1/4, 1/2 and all of d_sae; under 16
latents, the groups that would be empty merge into the next).

SAELens trains Matryoshka BatchTopK SAEs and saves them for inference as JumpReLU SAEs with one threshold;
lmscope exports the same way (as BatchTopK does), marked so that an import restores a Matryoshka dictionary. The
groups only shape training, so an imported one has the default groups. SAELens's training checkpoints
(`matryoshka_batchtopk`) are not imported.
"""

from __future__ import annotations

import math
from typing import ClassVar

from torch import Tensor

from lmscope.dictionaries.base import DictConfig, DictionaryError, LossState, TrainOutput, register
from lmscope.dictionaries.batchtopk import BatchTopKDictionary
from lmscope.dictionaries.topk import aux_k_loss

DEFAULT_GROUPS = (1 / 16, 1 / 16, 1 / 8, 1 / 4, 1 / 2)


def prefix_ends(cfg: DictConfig) -> list[int]:
    """The end of each nested prefix (strictly increasing, the last one d_sae), from `cfg.matryoshka_groups`.

    Raises DictionaryError, in one line naming the fix, when the groups cannot split d_sae.
    """
    groups = [float(g) for g in (cfg.matryoshka_groups or DEFAULT_GROUPS)]
    given = f"matryoshka_groups={[f'{g:g}' for g in groups]}".replace("'", "")
    if any(not (g > 0 and math.isfinite(g)) for g in groups):
        raise DictionaryError(f"{given}: every group size must be positive")
    total = sum(groups)
    if math.isclose(total, 1.0, rel_tol=1e-6):  # fractions of d_sae
        ends = [round(cfg.d_sae * sum(groups[: i + 1])) for i in range(len(groups))]
        ends[-1] = cfg.d_sae
    elif all(g == int(g) for g in groups) and int(total) == cfg.d_sae:  # latent counts
        ends = [int(sum(groups[: i + 1])) for i in range(len(groups))]
    else:
        raise DictionaryError(
            f"{given} sums to {total:g}; give fractions of d_sae summing to 1 or latent counts summing to "
            f"d_sae={cfg.d_sae}"
        )
    if not cfg.matryoshka_groups:  # the default groups: a small dictionary merges the groups it cannot fill
        return sorted({e for e in ends if e > 0})
    if any(b <= a for a, b in zip([0, *ends], ends, strict=False)):
        raise DictionaryError(
            f"{given} leaves a group with no latent at d_sae={cfg.d_sae}; use fewer or larger groups, or a wider "
            "dictionary"
        )
    return ends


@register("matryoshka")
class MatryoshkaDictionary(BatchTopKDictionary):
    loss_terms: ClassVar[tuple[str, ...]] = ("mse", "aux", "prefix_mse")
    # SAELens's `batchtopk` loads as BatchTopK; lmscope's own exports of this class come back through their metadata
    saelens_imports: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def validate_config(cls, cfg: DictConfig) -> None:
        super().validate_config(cfg)
        prefix_ends(cfg)

    def __init__(self, cfg: DictConfig) -> None:
        super().__init__(cfg)
        self.prefixes = prefix_ends(cfg)

    def training_loss(self, x: Tensor, target: Tensor, state: LossState) -> TrainOutput:
        pre = self.pre_acts(x)
        z = self.select(pre, state)
        # the prefixes' reconstructions, each adding one group's latents to the previous one (one full decode in all)
        recon = self.b_dec.expand_as(target)
        if self.cfg.skip:
            recon = self.with_skip(recon, x)
        inner = x.new_zeros(())
        start = 0
        for end in self.prefixes:
            recon = recon + z[:, start:end] @ self.W_dec[start:end]
            if end < self.cfg.d_sae:
                inner = inner + self.mse(target, recon)
            start = end
        mse = self.mse(target, recon)
        aux = aux_k_loss(self, x, target, recon, state.dead_mask)
        active = z > 0
        return TrainOutput(
            loss=mse + inner + self.cfg.aux_coeff * aux,
            recon=recon,
            fired=active.sum(0).float(),
            l0=active.sum(-1).float().mean().detach(),
            terms={"mse": mse.detach(), "aux": aux.detach(), "prefix_mse": inner.detach()},
        )
