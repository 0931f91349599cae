"""Crosscoders over BASE and OTHER: paired activations at one hook, training, and each latent's relative norm.

A crosscoder reads [a_base | a_other] (2 x d_model) and reconstructs both halves; every latent has a decoder
half per model. The relative decoder norm of a latent,

    delta = 0.5 * ((|d_other| - |d_base|) / max(|d_base|, |d_other|) + 1)

is 0 for a BASE-only latent, 0.5 for a shared one and 1 for an OTHER-only one (Minder et al. 2025). The default
is a BatchTopK crosscoder (the `batchtopk` architecture with n_models = 2: its sparsity does not reward a latent
for writing to one model only); `crosscoder_l1` is the L1 crosscoder of Lindsey et al. 2024, kept to reproduce the
spurious OTHER-only latents it makes. (`relative_norms` and `band` live with the crosscoder dictionaries and are
re-exported here.) Both train with lmscope's Trainer (checkpoints, exact resume) from one
stream of pairs, so an L1 comparison costs one pass.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lmscope.core.progress import ProgressCallback
from lmscope.dictionaries.base import DictConfig, Dictionary
from lmscope.dictionaries.crosscoder import BASE_ONLY, OTHER_ONLY, SHARED, band, relative_norms
from lmscope.diff.pair import Contexts
from lmscope.errors import DiffError
from lmscope.model.adapter import Model
from lmscope.training.trainer import RunSpec, TensorSource, TrainConfig, Trainer, default_lr


@dataclass
class CrosscoderConfig:
    layer: int | None = None  # None: the middle layer
    site: str = "resid_post"
    expansion: int = 8  # latents per d_model
    k: int = 32  # BatchTopK: mean active latents per token
    l1: bool = False  # also train an L1 crosscoder on the same pairs (for the artefact comparison)
    l1_coeff: float = 2.0
    epochs: int = 4  # passes over the paired activations
    batch_size: int = 1024
    lr: float | None = None
    seed: int = 0

    def hook(self, model: Model) -> str:
        layer = self.layer if self.layer is not None else model.n_layers // 2
        if not 0 <= layer < model.n_layers:
            raise DiffError(f"crosscoder layer {layer} is out of range (0..{model.n_layers - 1})")
        return f"blocks.{layer}.{self.site}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def paired_activations(base: Model, other: Model, hook: str, ctx: Contexts, batch: int = 8) -> tuple[Tensor, Tensor]:
    """(pairs [N, 2 d] = [a_base | a_other] at the non-special positions, where [N, 2] = (context, position))."""
    rows, where = [], []
    for s, tok, spec in ctx.batches(batch):
        with base.capture([hook]) as ab, torch.no_grad():
            base(tok)
        with other.capture([hook]) as ao, torch.no_grad():
            other(tok)
        keep = ~spec
        rows.append(torch.cat([ab[hook].float().cpu()[keep], ao[hook].float().cpu()[keep]], dim=-1))
        idx = keep.nonzero()
        idx[:, 0] += s
        where.append(idx)
    pairs = torch.cat(rows)
    if pairs.shape[0] == 0:
        raise DiffError("the corpus gave no non-special tokens to pair")
    return pairs, torch.cat(where)


def crosscoder_configs(cfg: CrosscoderConfig, d_model: int, hook: str, spec: str | None) -> list[RunSpec]:
    m = cfg.expansion * d_model
    # batch-level selection from the first step (token_topk_frac=0): what the diff's figures and organism tests were
    # measured with; BatchTopK's TopK phase (the default for SAEs) has not been evaluated on crosscoders
    runs = [RunSpec(DictConfig(arch="batchtopk", d_in=2 * d_model, d_sae=m, k=cfg.k, n_models=2, hook=hook,
                               model=spec, token_topk_frac=0.0), name="batchtopk", lr=cfg.lr)]  # fmt: skip
    if cfg.l1:  # the same peak LR as the BatchTopK run (ReLU's default 5e-5 is meant for far longer runs)
        lr = cfg.lr if cfg.lr is not None else default_lr(runs[0].dict_cfg)
        runs.append(RunSpec(DictConfig(arch="crosscoder_l1", d_in=2 * d_model, d_sae=m, l1_coeff=cfg.l1_coeff,
                                       n_models=2, hook=hook, model=spec), name="l1", lr=lr))  # fmt: skip
    return runs


def train_crosscoders(
    pairs: Tensor, cfg: CrosscoderConfig, hook: str, out: Path | None, spec: str | None = None,
    progress: ProgressCallback | None = None,
) -> dict[str, Dictionary]:  # fmt: skip
    """Train the crosscoder(s) on the pairs (`epochs` passes); saved under out/batchtopk (and out/l1), with a
    checkpoint every 200 steps so a killed run resumes."""
    if pairs.shape[0] < cfg.batch_size:
        raise DiffError(
            f"{pairs.shape[0]} paired tokens are fewer than one batch ({cfg.batch_size}); use a larger corpus "
            "(--contexts) or a smaller --batch-size"
        )
    d_model = pairs.shape[1] // 2
    source = TensorSource(pairs, batch_size=cfg.batch_size, epochs=cfg.epochs)
    total = len(source) * cfg.batch_size
    warmup = min(200, max(1, len(source) // 10))
    tc = TrainConfig(total_tokens=total, warmup_steps=warmup, seed=cfg.seed, checkpoint_every=200, log_every=25,
                     dead_window_tokens=max(total // 4, cfg.batch_size))  # fmt: skip
    trainer = Trainer(crosscoder_configs(cfg, d_model, hook, spec), tc, out_dir=out)
    return trainer.fit(source, progress=progress)


@torch.no_grad()
def encode_pairs(d: Dictionary, pairs: Tensor, chunk: int = 8192) -> Tensor:
    """Dense latents [N, d_sae] (float32) of the pairs."""
    return torch.cat([d.encode(pairs[s : s + chunk]) for s in range(0, pairs.shape[0], chunk)])


__all__ = ["BASE_ONLY", "OTHER_ONLY", "SHARED", "CrosscoderConfig", "band", "crosscoder_configs", "encode_pairs",
           "paired_activations", "relative_norms", "train_crosscoders"]  # fmt: skip
