"""ReLU dictionary with an L1 penalty weighted by decoder norm (Anthropic, April 2024 update).

loss = |x - x_hat|^2 + lambda * sum_i z_i |W_dec[i]|; the decoder norm is free (not constrained), lambda ramps
up linearly over the first `l1_warmup_frac` of training, decoder rows start at norm 0.1. With `target_l0` set the
trainer's controller chooses lambda each step instead (`l1_coeff` is then its starting value).
SAELens: `standard` SAEs, and `transcoder` for a transcoder whose output width differs from its input's.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from lmscope.dictionaries.base import DictConfig, Dictionary, LossState, TrainOutput, register


@register("relu")
class ReLUDictionary(Dictionary):
    unit_norm_decoder = False
    sparsity_param = "l1_coeff"
    run_tag = "l1_{l1_coeff:g}"
    loss_terms = ("mse", "l1")
    saelens_arch: ClassVar[str | None] = "standard"
    saelens_imports: ClassVar[tuple[str, ...]] = ("standard", "transcoder")
    controlled_coeff: ClassVar[str | None] = "l1_coeff"

    def to_saelens(self, tensors: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """A transcoder to another width is SAELens's `transcoder` class (ReLU); the standard SAE has no d_out."""
        return tensors, ({"architecture": "transcoder"} if self.cfg.d_out != self.cfg.d_in else {})

    @classmethod
    def default_lr(cls, cfg: DictConfig) -> float:
        return 5e-5

    def initial_decoder_norm(self) -> float:
        return 0.1

    def penalty_weights(self) -> Tensor:
        """[d_sae]: how much each latent's activation costs in the L1 term (its decoder norm)."""
        return self.W_dec.norm(dim=1)

    def activation(self, pre: Tensor) -> Tensor:
        return torch.relu(pre)

    def training_loss(self, x: Tensor, target: Tensor, state: LossState) -> TrainOutput:
        z = torch.relu(self.pre_acts(x))
        recon = self.with_skip(z @ self.W_dec + self.b_dec, x)
        mse = self.mse(target, recon)
        l1 = (z * self.penalty_weights()).sum(-1).mean()
        loss = mse + self.penalty_coeff(state, self.cfg.l1_warmup_frac) * l1
        active = z > 0
        return TrainOutput(
            loss=loss,
            recon=recon,
            fired=active.sum(0).float(),
            l0=active.sum(-1).float().mean().detach(),
            terms={"mse": mse.detach(), "l1": l1.detach()},
        )
