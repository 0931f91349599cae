"""ReLU dictionary with an L1 penalty weighted by decoder norm (Anthropic, April 2024 update).

loss = |x - x_hat|^2 + lambda * sum_i z_i |W_dec[i]|; the decoder norm is free (not constrained), lambda ramps
up linearly over `l1_warmup_frac` of training, decoder rows start at norm 0.1 (but see the TopK phase). With
`target_l0` set the trainer's controller chooses lambda each step instead (`l1_coeff` is then its starting value).
SAELens: `standard` SAEs, and `transcoder` for a transcoder whose output width differs from its input's.

Training starts with a TopK phase (`token_topk_frac` of training, 0.875 by default; dictionaries/topk_phase.py):
each token keeps its top k latents (k = `target_l0` when set, else `k`), the AuxK loss revives dead ones, no L1
applies. At the first step after it, every encoder bias is lowered by the batch-level cut of k per token, so the
ReLU starts near k active latents per token instead of every positive pre-activation, and the L1 weight ramps in
from there over `l1_warmup_frac` of training. From random weights an L1-penalised ReLU recovered the fewest features
of all architectures on the recovery benchmark (docs/superposition.md).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from lmscope.dictionaries import topk_phase
from lmscope.dictionaries.base import DictConfig, Dictionary, LossState, TrainOutput, register


@register("relu")
class ReLUDictionary(Dictionary):
    unit_norm_decoder = False
    sparsity_param = "l1_coeff"
    run_tag = "l1_{l1_coeff:g}"
    loss_terms = ("mse", "l1", "aux")
    saelens_arch: ClassVar[str | None] = "standard"
    saelens_imports: ClassVar[tuple[str, ...]] = ("standard", "transcoder")
    controlled_coeff: ClassVar[str | None] = "l1_coeff"
    has_topk_phase: ClassVar[bool] = True
    default_topk_phase: ClassVar[float] = 0.875
    # the bias shift leaves the ReLU near the target L0, not dense: a target L0 is best approached from the config's
    # coefficient itself (from a twentieth of it, L0 ended 60% above a target of 6 in tests/test_topk_phase.py's case)
    control_start_after_phase: ClassVar[float | None] = 1.0

    def to_saelens(self, tensors: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """A transcoder to another width is SAELens's `transcoder` class (ReLU); the standard SAE has no d_out."""
        return tensors, ({"architecture": "transcoder"} if self.cfg.d_out != self.cfg.d_in else {})

    @classmethod
    def default_lr(cls, cfg: DictConfig) -> float:
        return 5e-5

    def initial_decoder_norm(self) -> float:
        """0.1 (Anthropic's recipe) without a TopK phase; 1 with one, where the per-token selection compares
        pre-activations as a unit-norm TopK does (from 0.1 the phase learnt less: toy4 MMCS 0.73 against 0.85)."""
        return 1.0 if topk_phase.fraction(self.cfg) > 0 else 0.1

    def penalty_weights(self) -> Tensor:
        """[d_sae]: how much each latent's activation costs in the L1 term (its decoder norm)."""
        return self.W_dec.norm(dim=1)

    def activation(self, pre: Tensor) -> Tensor:
        return torch.relu(pre)

    def training_loss(self, x: Tensor, target: Tensor, state: LossState) -> TrainOutput:
        in_phase = topk_phase.in_phase(self.cfg, state)
        if in_phase:
            z, recon, mse, aux = topk_phase.phase_step(self, x, target, state)[1:]
        else:
            if topk_phase.just_ended(self.cfg, state):
                self.leave_topk_phase(x)
            z = torch.relu(self.pre_acts(x))
            recon = self.with_skip(z @ self.W_dec + self.b_dec, x)
            mse = self.mse(target, recon)
            aux = x.new_zeros(())
        l1 = (z * self.penalty_weights()).sum(-1).mean()
        if in_phase:  # no L1 in the phase; after it the L1 weight ramps in from the phase's end
            loss = mse + self.cfg.aux_coeff * aux
        else:
            loss = mse + self.penalty_coeff(topk_phase.ramp_state(self.cfg, state), self.cfg.l1_warmup_frac) * l1
        active = z > 0
        return TrainOutput(
            loss=loss,
            recon=recon,
            fired=active.sum(0).float(),
            l0=active.sum(-1).float().mean().detach(),
            terms={"mse": mse.detach(), "l1": l1.detach(), "aux": aux.detach()},
        )

    @torch.no_grad()
    def leave_topk_phase(self, x: Tensor) -> None:
        """Lower every encoder bias by the batch-level cut of k per token: ReLU(pre - cut) keeps about what a
        batch-level top k would, instead of every positive pre-activation."""
        cut = topk_phase.batch_cut(self.pre_acts(x), topk_phase.phase_k(self.cfg))
        if cut is not None:
            self.b_enc.sub_(cut)
