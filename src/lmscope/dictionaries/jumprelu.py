"""JumpReLU dictionary (Rajamanoharan et al. 2024): z = pre * [pre > theta], one learnt threshold per latent.

The L0 penalty sum_i [pre_i > theta_i] has no gradient; straight-through estimators with a rectangle kernel
of width `jumprelu_bandwidth` give the thresholds a pseudo-derivative, both from the reconstruction (through
the jump) and from the L0 penalty (weighted by `l0_coeff`, ramped up over `l1_warmup_frac` of training; with
`target_l0` set, the trainer's controller chooses that weight each step, starting from `l0_coeff`).
The threshold is a parameter itself (kept >= MIN_THRESHOLD after each step), so files hold it exactly.

Training starts with a TopK phase (`token_topk_frac` of training, 0.875 by default; dictionaries/topk_phase.py): each
token keeps its top k pre-activations (k = `target_l0` when set, else `k`), the AuxK loss revives dead latents, and
no L0 penalty applies. Meanwhile every latent's threshold follows a running estimate of the batch-level cut of k per
token, so when the JumpReLU selection takes over its L0 starts near k; the L0 penalty then ramps in over
`l1_warmup_frac`. From random weights the L0 penalty and the thresholds kill latents early; on the recovery
benchmark at 10x superposition about half of them died (docs/superposition.md).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from lmscope.dictionaries import topk_phase
from lmscope.dictionaries.base import DictConfig, Dictionary, FormatError, LossState, TrainOutput, register

MIN_THRESHOLD = 1e-6


def _kernel(u: Tensor) -> Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, theta: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(x, theta)
        ctx.bandwidth = bandwidth
        return x * (x > theta)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, Tensor, None]:
        x, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_x = g * (x > theta)
        grad_theta = (-(theta / eps) * _kernel((x - theta) / eps) * g).sum(0)
        return grad_x, grad_theta, None


class _Step(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, theta: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(x, theta)
        ctx.bandwidth = bandwidth
        return (x > theta).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, Tensor, None]:
        x, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_theta = (-(1.0 / eps) * _kernel((x - theta) / eps) * g).sum(0)
        return torch.zeros_like(x), grad_theta, None


@register("jumprelu")
class JumpReLUDictionary(Dictionary):
    sparsity_param = "l0_coeff"
    run_tag = "l0_{l0_coeff:g}"
    loss_terms = ("mse", "l0", "aux")
    saelens_arch = "jumprelu"
    saelens_imports = ("jumprelu", "jumprelu_transcoder")
    controlled_coeff = "l0_coeff"
    has_topk_phase: ClassVar[bool] = True
    default_topk_phase: ClassVar[float] = 0.875

    @classmethod
    def default_lr(cls, cfg: DictConfig) -> float:
        return 7e-5

    @classmethod
    def extra_tensor_shapes(cls, cfg: DictConfig) -> dict[str, tuple[int, ...]]:
        return {"threshold": (cfg.d_sae,)}

    def to_saelens(self, tensors: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """A transcoder to another width is SAELens's `jumprelu_transcoder` class."""
        return tensors, ({"architecture": "jumprelu_transcoder"} if self.cfg.d_out != self.cfg.d_in else {})

    @classmethod
    def from_saelens(
        cls, tensors: dict[str, Tensor], k: int | None, src: str, restored: bool
    ) -> tuple[dict[str, Tensor], int | None]:
        """SAELens computes relu(pre) * (pre > threshold): a negative threshold acts as 0, so it loads as 0 (exact)."""
        theta = tensors.get("threshold")
        if theta is not None and not bool(torch.isfinite(theta).all()):
            raise FormatError(f"{src}: threshold holds NaN or infinite values; the file is damaged")
        return ({**tensors, "threshold": theta.clamp_min(0.0)} if theta is not None else tensors), k

    def __init__(self, cfg: DictConfig) -> None:
        super().__init__(cfg)
        self.threshold = nn.Parameter(torch.full((cfg.d_sae,), float(cfg.jumprelu_init_threshold)))

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        super().reset_parameters(generator)
        if hasattr(self, "threshold"):
            self.threshold.fill_(float(self.cfg.jumprelu_init_threshold))

    @torch.no_grad()
    def post_step(self) -> None:
        super().post_step()
        self.threshold.clamp_(min=MIN_THRESHOLD)

    def activation(self, pre: Tensor) -> Tensor:
        theta = self.threshold
        return torch.where(pre > theta, pre, torch.zeros_like(pre))

    def training_loss(self, x: Tensor, target: Tensor, state: LossState) -> TrainOutput:
        if topk_phase.in_phase(self.cfg, state):
            return self.topk_phase_loss(x, target, state)
        pre = self.pre_acts(x)
        theta = self.threshold
        bw = self.cfg.jumprelu_bandwidth
        z = _JumpReLU.apply(pre, theta, bw)
        recon = self.with_skip(z @ self.W_dec + self.b_dec, x)
        mse = self.mse(target, recon)
        l0 = _Step.apply(pre, theta, bw).sum(-1).mean()
        active = z > 0
        return TrainOutput(
            loss=mse + self.penalty_coeff(topk_phase.ramp_state(self.cfg, state), self.cfg.l1_warmup_frac) * l0,
            recon=recon,
            fired=active.sum(0).float(),
            l0=l0.detach(),
            terms={"mse": mse.detach(), "l0": l0.detach(), "aux": torch.zeros((), device=x.device)},
        )

    def topk_phase_loss(self, x: Tensor, target: Tensor, state: LossState) -> TrainOutput:
        """The TopK phase's step: each token's top k, AuxK for dead latents, the thresholds set to the batch cut."""
        p = topk_phase.phase_step(self, x, target, state)
        self.estimate_threshold(p.pre, topk_phase.phase_k(self.cfg), state.step)
        active = p.z > 0
        l0 = active.sum(-1).float().mean().detach()
        # the thresholds take no part in this loss; a zero term keeps them in the graph (DDP expects every parameter
        # to receive a gradient), and Adam leaves a parameter whose gradients have all been zero where it is
        return TrainOutput(
            loss=p.mse + self.cfg.aux_coeff * p.aux + 0.0 * self.threshold.sum(),
            recon=p.recon,
            fired=active.sum(0).float(),
            l0=l0,
            terms={"mse": p.mse.detach(), "l0": l0, "aux": p.aux.detach()},
        )

    @torch.no_grad()
    def estimate_threshold(self, pre: Tensor, k: int, step: int) -> None:
        """Every latent's threshold := the running estimate of the batch-level cut of k per token, as update number
        `step` (the phase starts at step 0, whose estimate replaces the initial threshold; the count comes from the
        trainer, so a resumed run folds exactly as an uninterrupted one)."""
        low = topk_phase.batch_cut(pre, k)  # the same on every rank under torchrun
        if low is not None:
            topk_phase.fold(self.threshold, low.clamp_min(MIN_THRESHOLD), step)
