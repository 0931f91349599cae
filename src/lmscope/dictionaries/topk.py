"""TopK dictionary (Gao et al. 2024): keep the k largest pre-activations per token, with the AuxK loss.

AuxK: the residual the main reconstruction leaves is reconstructed from the top `aux_k` pre-activations of
the dead latents only; that loss (weighted by `aux_coeff`) gives dead latents a gradient that revives them.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import Tensor

from lmscope.dictionaries.base import (
    DictConfig,
    Dictionary,
    DictionaryError,
    FormatError,
    LossState,
    TrainOutput,
    register,
)
from lmscope.dictionaries.select import top_k
from lmscope.dictionaries.sparse_decode import fused_topk, sparse_decode


def aux_k_loss(dictionary: Dictionary, x: Tensor, target: Tensor, recon: Tensor, dead_mask: Tensor | None) -> Tensor:
    """Reconstruct the residual (target - recon, detached) from the top pre-activations of the dead latents.

    Only the dead latents' pre-activations are computed (x @ W_enc[:, dead]), so the cost scales with their count;
    with no dead latent nothing is computed, not even the residual.
    """
    if dead_mask is None or not bool(dead_mask.any()):
        return x.new_zeros(())
    residual = (target - recon).detach()
    dead = dead_mask.nonzero().squeeze(1)
    w = dictionary.W_enc.index_select(1, dead)
    pre = x @ w + dictionary.b_enc.index_select(0, dead)
    if dictionary.cfg.apply_b_dec_to_input:
        pre = pre - dictionary.b_dec @ w
    aux_k = min(int(dictionary.cfg.aux_k or 1), dead.numel())
    vals, j = pre.topk(aux_k, dim=-1, sorted=False)
    e_hat = sparse_decode(torch.relu(vals), dead[j], dictionary.W_dec)
    scale = min(1.0, dead.numel() / aux_k)
    return scale * (e_hat - residual).pow(2).sum(-1).mean()


class KSparse(Dictionary):
    """What TopK and BatchTopK share: k active latents per token (on average), the AuxK loss, Gao et al.'s LR."""

    sparsity_param = "k"
    run_tag = "k{k}"
    loss_terms: ClassVar[tuple[str, ...]] = ("mse", "aux")

    @classmethod
    def default_lr(cls, cfg: DictConfig) -> float:
        """2e-4 / sqrt(d_sae / 2^14) (Gao et al. 2024)."""
        return 2e-4 / math.sqrt(cfg.d_sae / 2**14)

    @classmethod
    def target_l0(cls, cfg: DictConfig) -> float | None:
        """k: the mean number of active latents per token it is built to have."""
        return float(cfg.k)

    @classmethod
    def validate_config(cls, cfg: DictConfig) -> None:
        if cfg.k > cfg.d_sae:
            raise DictionaryError(f"k={cfg.k} exceeds d_sae={cfg.d_sae}; pick k <= d_sae")


@register("topk")
class TopKDictionary(KSparse):
    saelens_arch = "topk"
    saelens_imports = ("topk",)

    def to_saelens(self, tensors: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Any]]:
        if self.cfg.d_out != self.cfg.d_in:
            raise FormatError(
                f"a TopK transcoder ({self.cfg.d_in} -> {self.cfg.d_out}) has no SAELens counterpart: SAELens's topk "
                "class has no output width of its own and its transcoders are ReLU or JumpReLU; save it in lmscope's "
                "format instead"
            )
        return tensors, {"k": self.cfg.k, "rescale_acts_by_decoder_norm": False}

    @classmethod
    def from_saelens(
        cls, tensors: dict[str, Tensor], k: int | None, src: str, restored: bool
    ) -> tuple[dict[str, Tensor], int | None]:
        if k is None:
            raise FormatError(f'{src}: a TopK SAE without k in its config; add "k" to cfg.json')
        return tensors, k

    def select(self, pre: Tensor) -> tuple[Tensor, Tensor]:
        vals, idx = top_k(pre, self.cfg.k)
        return torch.relu(vals), idx

    def activation(self, pre: Tensor) -> Tensor:
        vals, idx = self.select(pre)
        return torch.zeros_like(pre).scatter_(-1, idx, vals)

    def encode_sparse(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(values, indices), each [..., k]: the compact form of the latents."""
        return self.select(self.pre_acts(x))

    def decode_sparse(self, vals: Tensor, idx: Tensor) -> Tensor:
        shape = vals.shape[:-1]
        k = vals.shape[-1]
        out = sparse_decode(vals.reshape(-1, k), idx.reshape(-1, k), self.W_dec) + self.b_dec
        return out.reshape(*shape, -1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        vals, idx = self.encode_sparse(x)
        z = torch.zeros(*x.shape[:-1], self.cfg.d_sae, dtype=vals.dtype, device=vals.device)
        return self.with_skip(self.decode_sparse(vals, idx), x), z.scatter_(-1, idx, vals)

    def training_loss(self, x: Tensor, target: Tensor, state: LossState) -> TrainOutput:
        # one fused autograd Function: dense encoder forward, sparse everything else (see sparse_decode.py)
        recon, vals, idx = fused_topk(
            x, self.W_enc, self.b_enc, self.W_dec, self.b_dec, self.cfg.k, bool(self.cfg.apply_b_dec_to_input)
        )
        recon = self.with_skip(recon, x)
        mse = self.mse(target, recon)
        aux = aux_k_loss(self, x, target, recon, state.dead_mask)
        loss = mse + self.cfg.aux_coeff * aux
        active = vals > 0
        fired = torch.zeros(self.cfg.d_sae, device=x.device).index_add_(0, idx.reshape(-1), active.reshape(-1).float())
        return TrainOutput(
            loss=loss,
            recon=recon,
            fired=fired,
            l0=active.sum(-1).float().mean().detach(),
            terms={"mse": mse.detach(), "aux": aux.detach()},
        )
