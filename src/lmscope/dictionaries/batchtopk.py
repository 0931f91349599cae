"""BatchTopK dictionary (Bussmann et al. 2024): keep the k * batch largest activations across the batch.

Training selects per batch, so the number of active latents varies by token. For inference the dictionary
uses one saved threshold: a latent is active when its pre-activation exceeds it. The threshold is an
average of the smallest activation kept in each training batch (a plain running mean over the first 100
batches, then an exponential moving average with momentum 0.99), stored as a buffer (`threshold`) and saved
with the weights; it is NaN until estimated, and inference refuses to run then.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lmscope.dictionaries.base import Dictionary, DictionaryError, LossState, TrainOutput, register
from lmscope.dictionaries.topk import aux_k_loss

THRESHOLD_MOMENTUM = 0.99


@register("batchtopk")
class BatchTopKDictionary(Dictionary):
    threshold: Tensor

    def __init__(self, cfg: object) -> None:
        super().__init__(cfg)  # type: ignore[arg-type]
        self.register_buffer("threshold", torch.tensor(float("nan")))
        self.register_buffer("threshold_updates", torch.tensor(0, dtype=torch.long))

    def activation(self, pre: Tensor) -> Tensor:
        theta = float(self.threshold)
        if math.isnan(theta):
            raise DictionaryError(
                "this BatchTopK dictionary has no inference threshold (it was never trained, or a file lost it); "
                "train it with lmscope's trainer or load a file that includes `threshold`"
            )
        return torch.where(pre > max(theta, 0.0), pre, torch.zeros_like(pre))

    def batch_select(self, pre: Tensor) -> Tensor:
        flat = torch.relu(pre).reshape(-1)
        n = min(self.cfg.k * pre.shape[0], flat.numel())
        vals, idx = flat.topk(n, sorted=False)
        return torch.zeros_like(flat).scatter_(0, idx, vals).reshape(pre.shape)

    @torch.no_grad()
    def update_threshold(self, z: Tensor) -> None:
        positive = z[z > 0]
        if positive.numel() == 0:
            return
        low = positive.min()
        n = int(self.threshold_updates)
        momentum = min(THRESHOLD_MOMENTUM, n / (n + 1))  # a running mean first, so early batches fade out
        if torch.isnan(self.threshold):
            self.threshold.copy_(low)
        else:
            self.threshold.mul_(momentum).add_((1 - momentum) * low)
        self.threshold_updates.add_(1)

    def training_loss(self, x: Tensor, target: Tensor, state: LossState) -> TrainOutput:
        pre = self.pre_acts(x)
        z = self.batch_select(pre)
        self.update_threshold(z.detach())
        recon = z @ self.W_dec + self.b_dec
        mse = self.mse(target, recon)
        aux = aux_k_loss(self, x, (target - recon).detach(), state.dead_mask)
        active = z > 0
        return TrainOutput(
            loss=mse + self.cfg.aux_coeff * aux,
            recon=recon,
            fired=active.sum(0).float(),
            l0=active.sum(-1).float().mean().detach(),
            terms={"mse": mse.detach(), "aux": aux.detach()},
        )
