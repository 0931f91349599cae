"""BatchTopK dictionary (Bussmann et al. 2024): keep the k * batch largest activations across the batch.

Training selects per batch, so the number of active latents varies by token. For inference the dictionary
uses one saved threshold: a latent is active when its pre-activation exceeds it. The threshold is an
average of the smallest activation kept in each training batch (a plain running mean over the first 100
batches, then an exponential moving average with momentum 0.99), stored as a buffer (`threshold`) and saved
with the weights; it is NaN until estimated, and inference refuses to run then.

Training starts with a TopK phase (`token_topk_frac` of training, 0.75 by default; 0 turns it off): each token
keeps its own k largest activations, as a TopK dictionary does, and only then does the batch-level selection take
over. On the ground-truth recovery benchmark, batch selection from the start leaves many latents dead at high
superposition (at 10x, MMCS 0.59 against TopK's 0.76, 59% dead; docs/superposition.md); after the TopK phase the
latents are spread out, and the batch phase then gives BatchTopK its variable number of latents per token. During
the TopK phase the threshold is a running estimate from the batch-level cut of a sample of the batch's tokens (so
a run stopped early can still be used); the batch phase's first step replaces it, and its running mean starts afresh.

SAELens has no BatchTopK at inference: an export is a JumpReLU SAE whose per-latent thresholds all equal the
saved one (what SAELens itself does), marked in its metadata so that an import restores BatchTopK; a transcoder
exports as a `jumprelu_transcoder`. A SAELens BatchTopK training checkpoint (`architecture: batchtopk`, a scalar
`topk_threshold`) loads as BatchTopK.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import Tensor

from lmscope.dictionaries import topk_phase
from lmscope.dictionaries.base import DictConfig, DictionaryError, FormatError, LossState, TrainOutput, register
from lmscope.dictionaries.topk import KSparse, aux_k_loss


@register("batchtopk")
class BatchTopKDictionary(KSparse):
    saelens_arch = "jumprelu"
    saelens_imports: ClassVar[tuple[str, ...]] = ("batchtopk",)
    threshold: Tensor
    threshold_updates: Tensor

    @classmethod
    def extra_tensor_shapes(cls, cfg: DictConfig) -> dict[str, tuple[int, ...]]:
        return {"threshold": ()}

    has_topk_phase = True
    default_topk_phase = 0.75

    def to_saelens(self, tensors: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Any]]:
        theta = float(tensors["threshold"])
        if theta != theta:  # NaN
            raise FormatError("this BatchTopK dictionary has no threshold yet; train it before exporting")
        extra = {"architecture": "jumprelu_transcoder"} if self.cfg.d_out != self.cfg.d_in else {}
        return {**tensors, "threshold": torch.full((self.cfg.d_sae,), max(theta, 0.0))}, extra

    @classmethod
    def from_saelens(
        cls, tensors: dict[str, Tensor], k: int | None, src: str, restored: bool
    ) -> tuple[dict[str, Tensor], int | None]:
        theta = tensors.get("threshold")
        if theta is None and "topk_threshold" in tensors:
            # a SAELens 6 training checkpoint (BatchTopKTrainingSAE.save_model): the scalar threshold under its name
            theta = tensors["topk_threshold"]
            tensors = {**{name: t for name, t in tensors.items() if name != "topk_threshold"}, "threshold": theta}
        if restored:  # an lmscope export: a JumpReLU SAE whose thresholds all equal the BatchTopK one
            if theta is None or not bool((theta == theta[0]).all()):
                raise FormatError(f"{src}: marked as an lmscope BatchTopK export, but its thresholds are not all equal")
            return {**tensors, "threshold": theta[0].clone()}, k
        if theta is None:
            raise FormatError(
                f"{src}: a BatchTopK SAE without its inference threshold (`threshold` in sae_weights.safetensors); "
                "it would silently run as a plain ReLU SAE. Re-save it from SAELens as a JumpReLU SAE (with the "
                "threshold)"
            )
        if theta.ndim == 1:
            raise FormatError(f"{src}: a batchtopk SAE has one threshold, got a vector; load it as jumprelu instead")
        return tensors, k

    def __init__(self, cfg: DictConfig) -> None:
        super().__init__(cfg)
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
        return topk_phase.batch_topk(pre, self.cfg.k)

    def select(self, pre: Tensor, state: LossState) -> Tensor:
        """The training selection of this step, with the threshold updated to match."""
        if topk_phase.in_phase(self.cfg, state):
            z = topk_phase.token_topk(pre, self.cfg.k)
            self.estimate_threshold(pre.detach(), state.step)
        else:
            z = self.batch_select(pre)
            self.update_threshold(z.detach())
        return z

    @torch.no_grad()
    def estimate_threshold(self, pre: Tensor, step: int) -> None:
        """TopK phase: the batch-level cut of a sample of tokens folded in as update number `step` (a running mean
        that the batch phase restarts; the count is the trainer's, so a resumed run folds as an uninterrupted one)."""
        low = topk_phase.batch_cut(pre, self.cfg.k)
        if low is not None:
            topk_phase.fold(self.threshold, low, step)
            self.threshold_updates.fill_(0)  # so the batch phase's first update replaces this estimate

    @torch.no_grad()
    def update_threshold(self, z: Tensor) -> None:
        """Batch phase: fold the smallest activation this step's selection kept into the threshold."""
        positive = z[z > 0]
        if positive.numel():
            topk_phase.fold(self.threshold, positive.min(), int(self.threshold_updates))
            self.threshold_updates.add_(1)

    def training_loss(self, x: Tensor, target: Tensor, state: LossState) -> TrainOutput:
        pre = self.pre_acts(x)
        z = self.select(pre, state)
        recon = self.with_skip(z @ self.W_dec + self.b_dec, x)
        mse = self.mse(target, recon)
        aux = aux_k_loss(self, x, target, recon, state.dead_mask)
        active = z > 0
        return TrainOutput(
            loss=mse + self.cfg.aux_coeff * aux,
            recon=recon,
            fired=active.sum(0).float(),
            l0=active.sum(-1).float().mean().detach(),
            terms={"mse": mse.detach(), "aux": aux.detach()},
        )
