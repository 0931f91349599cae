"""JumpReLU dictionary (Rajamanoharan et al. 2024): z = pre * [pre > theta], one learnt threshold per latent.

The L0 penalty sum_i [pre_i > theta_i] has no gradient; straight-through estimators with a rectangle kernel
of width `jumprelu_bandwidth` give the thresholds a pseudo-derivative, both from the reconstruction (through
the jump) and from the L0 penalty (weighted by `l0_coeff`, ramped up over `l1_warmup_frac` of training; with
`target_l0` set, the trainer's controller chooses that weight each step, starting from `l0_coeff`).
The threshold is a parameter itself (kept >= MIN_THRESHOLD after each step), so files hold it exactly.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

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
    loss_terms = ("mse", "l0")
    saelens_arch = "jumprelu"
    saelens_imports = ("jumprelu", "jumprelu_transcoder")
    controlled_coeff = "l0_coeff"

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
        pre = self.pre_acts(x)
        theta = self.threshold
        bw = self.cfg.jumprelu_bandwidth
        z = _JumpReLU.apply(pre, theta, bw)
        recon = self.with_skip(z @ self.W_dec + self.b_dec, x)
        mse = self.mse(target, recon)
        l0 = _Step.apply(pre, theta, bw).sum(-1).mean()
        active = z > 0
        return TrainOutput(
            loss=mse + self.penalty_coeff(state, self.cfg.l1_warmup_frac) * l0,
            recon=recon,
            fired=active.sum(0).float(),
            l0=l0.detach(),
            terms={"mse": mse.detach(), "l0": l0.detach()},
        )
