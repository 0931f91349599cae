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

from lmscope.dictionaries.base import DictConfig, DictionaryError, FormatError, LossState, TrainOutput, register
from lmscope.dictionaries.topk import KSparse, aux_k_loss

THRESHOLD_MOMENTUM = 0.99
_CUT_SAMPLE_TOKENS = 512  # TopK phase: the tokens whose batch-level cut estimates the threshold


@register("batchtopk")
class BatchTopKDictionary(KSparse):
    saelens_arch = "jumprelu"
    saelens_imports: ClassVar[tuple[str, ...]] = ("batchtopk",)
    threshold: Tensor
    threshold_updates: Tensor

    @classmethod
    def extra_tensor_shapes(cls, cfg: DictConfig) -> dict[str, tuple[int, ...]]:
        return {"threshold": ()}

    @classmethod
    def validate_config(cls, cfg: DictConfig) -> None:
        super().validate_config(cfg)
        frac = float(cfg.token_topk_frac)
        if not 0.0 <= frac < 1.0:
            raise DictionaryError(
                f"token_topk_frac={frac:g} is out of range: it is the fraction of training that selects per token "
                "before the batch-level selection, in [0, 1) (0: batch selection throughout)"
            )

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
        self._cut_updates = 0  # TopK-phase estimates so far (a resumed run restarts this running mean)

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

    def token_select(self, pre: Tensor) -> Tensor:
        """The TopK phase's selection: each token's k largest pre-activations (ReLU'd)."""
        vals, idx = pre.topk(min(self.cfg.k, pre.shape[-1]), dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter_(-1, idx, torch.relu(vals))

    def in_token_phase(self, state: LossState) -> bool:
        return state.progress < float(self.cfg.token_topk_frac)

    def select(self, pre: Tensor, state: LossState) -> Tensor:
        """The training selection of this step, with the threshold updated to match."""
        if self.in_token_phase(state):
            z = self.token_select(pre)
            self.estimate_threshold(pre.detach())
        else:
            z = self.batch_select(pre)
            self.update_threshold(z.detach())
        return z

    @torch.no_grad()
    def estimate_threshold(self, pre: Tensor) -> None:
        """TopK phase: the batch-level cut of a sample of tokens, as a running mean that the batch phase restarts."""
        if self._fold_threshold(self.batch_select(pre[:_CUT_SAMPLE_TOKENS]), self._cut_updates):
            self._cut_updates += 1
            self.threshold_updates.fill_(0)  # so the batch phase's first update replaces this estimate

    @torch.no_grad()
    def update_threshold(self, z: Tensor) -> None:
        if self._fold_threshold(z, int(self.threshold_updates)):
            self.threshold_updates.add_(1)

    def _fold_threshold(self, z: Tensor, n: int) -> bool:
        """Fold the smallest selected activation of `z` into the threshold as update number n: a running mean first,
        so early batches fade out, then an EMA. False when nothing was selected."""
        positive = z[z > 0]
        if positive.numel() == 0:
            return False
        low = positive.min()
        momentum = min(THRESHOLD_MOMENTUM, n / (n + 1))
        if torch.isnan(self.threshold):
            self.threshold.copy_(low)
        else:
            self.threshold.mul_(momentum).add_((1 - momentum) * low)
        return True

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
