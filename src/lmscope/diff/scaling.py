"""Latent Scaling (Minder et al. 2025): is an "OTHER-only" crosscoder latent really absent from BASE?

An L1 crosscoder can call a latent OTHER-only when BASE does carry it: its BASE decoder shrank to zero and the
BASE error keeps the information (Complete Shrinkage), or other latents reconstruct it in BASE (Latent
Decoupling). For latent j with activation f_j and OTHER decoder d_j, Latent Scaling fits, per model m, the one
scalar that best explains a target y_m by f_j d_j over the data:

    beta = sum_x f_j(x) <d_j, y_m(x)> / (|d_j|^2 sum_x f_j(x)^2)

with y_m = the error of model m's reconstruction plus latent j's own contribution to it (for nu_error), or model
m's whole reconstruction (for nu_recon; for OTHER it holds latent j's own contribution, so beta_recon_OTHER is
about 1 and the ratio is well conditioned). The ratios nu = beta_BASE / beta_OTHER are near 0 for a latent
BASE truly lacks, and near 1 when BASE holds the same thing; a latent is robustly OTHER-only when both ratios are
below `threshold`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lmscope.dictionaries.base import Dictionary

ROBUST = 0.3  # both ratios below this: robustly OTHER-only (the paper's plots separate near 0.2-0.4)


@torch.no_grad()
def latent_scaling(d: Dictionary, pairs: Tensor, latents: Tensor, chunk: int = 4096) -> dict[str, Tensor]:
    """beta (error and reconstruction, per model) and the two ratios for the given latents; each [len(latents)]."""
    W = d.W_dec.detach().float()
    half = W.shape[1] // 2
    D = W[latents]  # [n, 2h]
    Db, Do = D[:, :half], D[:, half:]
    n = len(latents)
    zz = torch.zeros(n, dtype=torch.float64)
    num_e = {m: torch.zeros(n, dtype=torch.float64) for m in ("base", "other")}
    num_r = {m: torch.zeros(n, dtype=torch.float64) for m in ("base", "other")}
    for s in range(0, pairs.shape[0], chunk):
        x = pairs[s : s + chunk].float()
        z = d.encode(x)
        recon = z @ W + d.b_dec.detach().float()
        err = x - recon
        f = z[:, latents]  # [b, n]
        zz += (f * f).sum(0).double()
        for m, sl in (("base", slice(0, half)), ("other", slice(half, None))):
            # sum_x f_j(x) <d_j_other, y(x)>, for y = err (then + f_j d_j_m) and y = recon
            e_proj = ((f.T @ err[:, sl]) * Do).sum(-1).double()
            r_proj = ((f.T @ recon[:, sl]) * Do).sum(-1).double()
            num_e[m] += e_proj
            num_r[m] += r_proj
    own = {"base": (Db * Do).sum(-1).double(), "other": (Do * Do).sum(-1).double()}
    dd = (Do * Do).sum(-1).double()
    denom = (dd * zz).clamp_min(1e-30)
    out: dict[str, Tensor] = {}
    for m in ("base", "other"):
        out[f"beta_error_{m}"] = (num_e[m] + zz * own[m]) / denom
        out[f"beta_recon_{m}"] = num_r[m] / denom
    out["nu_error"] = out["beta_error_base"] / out["beta_error_other"]
    out["nu_recon"] = out["beta_recon_base"] / out["beta_recon_other"]
    return {k: v.float() for k, v in out.items()}


def robust(scaling: dict[str, Tensor], threshold: float = ROBUST) -> Tensor:
    """[n] bool: both ratios finite and below the threshold (BASE explains less than `threshold` of it)."""
    ne, nr = scaling["nu_error"], scaling["nu_recon"]
    return ne.isfinite() & nr.isfinite() & (ne.abs() < threshold) & (nr.abs() < threshold)


def summarise(scaling: dict[str, Tensor], idx: Tensor) -> list[dict[str, Any]]:
    return [{"latent": int(j), **{k: round(float(v[i]), 4) for k, v in scaling.items()}} for i, j in enumerate(idx)]
