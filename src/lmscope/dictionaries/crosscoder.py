"""The L1 crosscoder (Lindsey et al. 2024): a ReLU dictionary over n_models activations side by side, whose
sparsity penalty weights each latent by the sum of its per-model decoder norms.

    x = [x_1 | ... | x_n]      loss = sum_m |x_m - x_hat_m|^2 + lambda * sum_j z_j * sum_m |W_dec[j, block m]|

The sum of norms (an L1 over models) rewards a latent for writing to one model only, which is exactly why L1
crosscoders invent model-exclusive latents through Complete Shrinkage and Latent Decoupling (Minder et al. 2025):
it is kept here to reproduce that artefact. The default crosscoder in `lmscope diff` is BatchTopK on the same
paired input (`batchtopk` with n_models = 2), whose sparsity has no such bias. It cannot be exported to SAELens.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lmscope.dictionaries.base import DictConfig, Dictionary, DictionaryError, register
from lmscope.dictionaries.relu import ReLUDictionary

OTHER_ONLY, BASE_ONLY, SHARED = 0.9, 0.1, (0.4, 0.6)  # relative-norm bands (Minder et al. 2025)


def block_norms(w_dec: Tensor, n_models: int) -> Tensor:
    """[d_sae, n_models]: the norm of each latent's decoder in each model's block."""
    return w_dec.reshape(w_dec.shape[0], n_models, -1).norm(dim=-1)


def relative_norms(d: Dictionary) -> Tensor:
    """[d_sae] relative decoder norm of every latent of a two-model crosscoder, [a_base | a_other]:

        delta = 0.5 * ((|d_other| - |d_base|) / max(|d_base|, |d_other|) + 1)

    0 for a BASE-only latent, 0.5 for a shared one, 1 for an OTHER-only one; NaN where both halves are zero."""
    if d.cfg.n_models != 2:
        raise DictionaryError(f"relative decoder norms need a two-model crosscoder (n_models={d.cfg.n_models})")
    n = block_norms(d.W_dec.detach().float(), 2)
    nb, no = n[:, 0], n[:, 1]
    top = torch.maximum(nb, no)
    return torch.where(top > 0, 0.5 * ((no - nb) / top.clamp_min(1e-12) + 1), torch.full_like(top, float("nan")))


def band(delta: float) -> str:
    """The name of a relative norm's band: other-only, base-only, shared, in between, or dead (NaN)."""
    if delta != delta:
        return "dead"
    if delta >= OTHER_ONLY:
        return "other-only"
    if delta <= BASE_ONLY:
        return "base-only"
    if SHARED[0] <= delta <= SHARED[1]:
        return "shared"
    return "in between"


@register("crosscoder_l1")
class L1CrosscoderDictionary(ReLUDictionary):
    crosscoder_only = True
    saelens_arch = None
    saelens_imports = ()

    @classmethod
    def validate_config(cls, cfg: DictConfig) -> None:
        if cfg.n_models < 2:
            raise DictionaryError("crosscoder_l1 needs n_models >= 2 (activations of two or more models side by side)")

    def penalty_weights(self) -> Tensor:
        """The sum of the latent's per-model decoder norms (ReLU's loss otherwise, unchanged)."""
        return block_norms(self.W_dec, self.cfg.n_models).sum(-1)
