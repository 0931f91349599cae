"""Score a dictionary against a ground truth (lmscope.synthetic.data): how many of the true features it recovered.

Any dictionary can be scored, from lmscope or not: give its decoder directions [d_sae, d] and an `encode` function
(activations [N, d] -> latents [N, d_sae]), and a `decode` function (latents -> reconstruction) for the FVU:

    report = score(truth, decoder, encode, decode)          # any library's dictionary
    report = score_dictionary(truth, lmscope_dictionary)    # an lmscope Dictionary
    report = score_latents(truth, decoder, samples, z_hat, x_hat)   # latents computed elsewhere

What it reports (`RecoveryReport`):
- `mmcs`: the mean over true features of the max cosine similarity between the feature's direction and a decoder
  row, and `recovered`: the fraction of true features with such a cosine above `threshold` (0.9); both also per
  frequency decile (decile 0: the most frequent tenth of the features);
- `fvu` (lmscope.dictionaries.metrics, the one definition), `l0` and `dead_frac` (latents that never fire on the
  samples);
- on the planted hierarchies, absorption and splitting (Chanin et al. 2024, "A is for Absorption"). For a parent
  feature P, its latent is the decoder row closest to P's direction. On samples where P and one of its children fire,
  P is *absorbed* when its latent stays silent while another active latent carries P's direction (cosine with P
  ≥ `absorb_cos`): the child's latent has taken the parent in. Absorption is averaged over the parents whose latent
  has cosine ≥ `parent_cos` with them (a dictionary without a latent for P cannot absorb it). P is *split* when two
  or more latents point along P (cosine ≥ `split_cos`) and fire almost only when P fires (precision ≥
  `split_precision`): P's meaning is spread over several specialised latents.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

from lmscope.dictionaries.base import Dictionary
from lmscope.dictionaries.metrics import FVUAccumulator
from lmscope.synthetic.data import GroundTruth, Samples
from lmscope.synthetic.errors import SyntheticError

Encode = Callable[[Tensor], Tensor]
Decode = Callable[[Tensor], Tensor]


@dataclass
class ScoreSettings:
    threshold: float = 0.9  # a true feature is recovered when some decoder row has cosine above this
    deciles: int = 10  # frequency bins
    absorb_cos: float = 0.25  # a latent with this cosine to a parent's direction carries the parent
    split_cos: float = 0.5  # a latent with this cosine to a parent's direction is one of its specialisations …
    split_precision: float = 0.9  # … when this fraction of its firings are on samples where the parent fires
    min_fires: int = 5  # a latent must fire this often to count as a specialisation
    parent_cos: float = 0.5  # absorption is averaged over the parents the dictionary has a latent for (this cosine)


@dataclass
class HierarchyScore:
    parent: int
    children: list[int]
    parent_latent: int  # the decoder row closest to the parent's direction
    parent_cos: float
    samples_alone: int  # samples where the parent fires without a child
    samples_with_child: int
    recall_alone: float  # how often the parent latent fires on those
    recall_with_child: float
    absorption: float  # fraction of parent-and-child samples where the parent is absorbed
    split_latents: int  # latents that specialise the parent (≥ 2: split)


@dataclass
class RecoveryReport:
    n_features: int  # true features scored
    d_sae: int
    samples: int
    mmcs: float
    recovered: float
    threshold: float
    deciles: list[dict[str, float]]  # decile, freq_hi, freq_lo, features, mmcs, recovered
    fvu: float | None
    l0: float
    dead_frac: float
    absorption: float | None  # mean over the planted hierarchies
    split_frac: float | None  # fraction of parents split into 2+ latents
    split_latents: float | None  # mean number of specialising latents per parent
    hierarchies: list[HierarchyScore] = field(default_factory=list)
    max_cos: list[float] = field(default_factory=list)  # per scored feature, in feature order

    def to_dict(self, per_feature: bool = False) -> dict[str, Any]:
        out = asdict(self)
        if not per_feature:
            out.pop("max_cos")
        return out

    def line(self) -> str:
        """One line of the headline figures."""
        parts = [f"MMCS {self.mmcs:.3f}", f"recovered {self.recovered:.1%}"]
        if self.fvu is not None:
            parts.append(f"FVU {self.fvu:.3f}")
        parts += [f"L0 {self.l0:.1f}", f"dead {self.dead_frac:.1%}"]
        if self.absorption is not None:
            parts.append(f"absorption {self.absorption:.1%}  split {self.split_frac:.0%}")
        return "  ".join(parts)


def _unit_rows(t: Tensor) -> Tensor:
    t = t.detach().float().cpu()
    return t / t.norm(dim=1, keepdim=True).clamp_min(1e-12)


def cosines(truth: GroundTruth, decoder: Tensor) -> Tensor:
    """[n, d_sae]: cosine of every true direction with every decoder row."""
    if decoder.ndim != 2 or decoder.shape[1] != truth.d:
        raise SyntheticError(
            f"recovery: decoder has shape {list(decoder.shape)}, expected [d_sae, {truth.d}]; pass the decoder "
            "directions with one row per latent (lmscope: Dictionary.decoder_directions)"
        )
    return truth.directions @ _unit_rows(decoder).T


class _Accumulator:
    """Streaming counts over chunks of (true magnitudes, latents, activations, reconstructions)."""

    def __init__(self, truth: GroundTruth, decoder: Tensor, s: ScoreSettings) -> None:
        self.truth, self.s = truth, s
        self.cos = cosines(truth, decoder)
        self.d_sae = int(decoder.shape[0])
        self.fired = torch.zeros(self.d_sae, dtype=torch.float64)
        self.active = 0.0
        self.n = 0
        self.fvu: FVUAccumulator | None = FVUAccumulator()
        self.parents = [p for p in truth.parents() if bool(truth.scorable[p])]
        self.kids = {p: truth.children_of(p) for p in self.parents}
        self.latent = {p: int(self.cos[p].argmax()) for p in self.parents}
        self.carriers = {p: self.cos[p] >= s.absorb_cos for p in self.parents}  # [d_sae] bool
        self.split_cands = {p: (self.cos[p] >= s.split_cos).nonzero().flatten() for p in self.parents}
        self.h: dict[int, dict[str, Any]] = {
            p: {"alone": 0, "alone_fired": 0, "with": 0, "with_fired": 0, "absorbed": 0,
                "cand_fired": torch.zeros(len(self.split_cands[p])), "cand_on_p": torch.zeros(len(self.split_cands[p]))}
            for p in self.parents
        }  # fmt: skip

    @torch.no_grad()
    def update(self, z_true: Tensor, z_hat: Tensor, x: Tensor | None, recon: Tensor | None) -> None:
        if z_hat.shape != (z_true.shape[0], self.d_sae):
            raise SyntheticError(
                f"recovery: encode returned shape {list(z_hat.shape)}, expected [{z_true.shape[0]}, {self.d_sae}] "
                "(one column per decoder row)"
            )
        on = z_hat.detach().float().cpu() > 0
        self.fired += on.sum(0).double()
        self.active += float(on.sum())
        self.n += int(z_true.shape[0])
        if recon is None or x is None:
            self.fvu = None
        elif self.fvu is not None:
            self.fvu.update(x.float().cpu(), recon.detach().float().cpu())
        true_on = z_true > 0
        for p in self.parents:
            hp = self.h[p]
            p_on = true_on[:, p]
            child_on = true_on[:, self.kids[p]].any(1)
            lat_on = on[:, self.latent[p]]
            alone, with_child = p_on & ~child_on, p_on & child_on
            others = on & self.carriers[p]
            others[:, self.latent[p]] = False
            hp["alone"] += int(alone.sum())
            hp["alone_fired"] += int((alone & lat_on).sum())
            hp["with"] += int(with_child.sum())
            hp["with_fired"] += int((with_child & lat_on).sum())
            hp["absorbed"] += int((with_child & ~lat_on & others.any(1)).sum())
            cand = on[:, self.split_cands[p]]
            hp["cand_fired"] += cand.sum(0).float()
            hp["cand_on_p"] += (cand & p_on[:, None]).sum(0).float()

    def report(self) -> RecoveryReport:
        s, truth = self.s, self.truth
        keep = truth.scorable.nonzero().flatten()
        if len(keep) == 0:
            raise SyntheticError("recovery: the ground truth has no scorable features (a toy source represented none)")
        max_cos = self.cos[keep].max(1).values
        order = torch.argsort(truth.freq[keep], descending=True, stable=True)
        deciles = []
        for i, idx in enumerate(torch.tensor_split(order, min(s.deciles, len(order)))):
            mc, fr = max_cos[idx], truth.freq[keep][idx]
            deciles.append(
                {"decile": i, "freq_hi": float(fr.max()), "freq_lo": float(fr.min()), "features": len(idx),
                 "mmcs": float(mc.mean()), "recovered": float((mc > s.threshold).float().mean())}
            )  # fmt: skip
        hier = []
        for p in self.parents:
            hp = self.h[p]
            precision = hp["cand_on_p"] / hp["cand_fired"].clamp_min(1)
            splits = int(((precision >= s.split_precision) & (hp["cand_fired"] >= s.min_fires)).sum())
            hier.append(
                HierarchyScore(
                    parent=p, children=self.kids[p], parent_latent=self.latent[p],
                    parent_cos=float(self.cos[p, self.latent[p]]), samples_alone=hp["alone"],
                    samples_with_child=hp["with"], recall_alone=hp["alone_fired"] / max(1, hp["alone"]),
                    recall_with_child=hp["with_fired"] / max(1, hp["with"]),
                    absorption=hp["absorbed"] / max(1, hp["with"]), split_latents=splits,
                )
            )  # fmt: skip
        counted = [h for h in hier if h.samples_with_child > 0 and h.parent_cos >= s.parent_cos]
        return RecoveryReport(
            n_features=len(keep), d_sae=self.d_sae, samples=self.n,
            mmcs=float(max_cos.mean()), recovered=float((max_cos > s.threshold).float().mean()), threshold=s.threshold,
            deciles=deciles, fvu=self.fvu.value() if self.fvu is not None and self.n else None,
            l0=self.active / max(1, self.n), dead_frac=float((self.fired == 0).double().mean()),
            absorption=sum(h.absorption for h in counted) / len(counted) if counted else None,
            split_frac=sum(h.split_latents >= 2 for h in hier) / len(hier) if hier else None,
            split_latents=sum(h.split_latents for h in hier) / len(hier) if hier else None,
            hierarchies=hier, max_cos=[float(v) for v in max_cos],
        )  # fmt: skip


def score_latents(
    truth: GroundTruth,
    decoder: Tensor,
    samples: Samples,
    latents: Tensor,
    recon: Tensor | None = None,
    settings: ScoreSettings | None = None,
) -> RecoveryReport:
    """Score latents [N, d_sae] already computed on `samples` (and their reconstructions, for the FVU)."""
    acc = _Accumulator(truth, decoder, settings or ScoreSettings())
    acc.update(samples.z, latents, samples.x, recon)
    return acc.report()


def score(
    truth: GroundTruth,
    decoder: Tensor,
    encode: Encode,
    decode: Decode | None = None,
    samples: Samples | None = None,
    n_samples: int = 8192,
    seed: int = 1_000_003,
    batch_size: int = 4096,
    settings: ScoreSettings | None = None,
) -> RecoveryReport:
    """Score any dictionary: its decoder rows [d_sae, d] and encode (and decode) functions on torch tensors.

    `samples` default to `n_samples` fresh draws from the truth (a seed apart from the training data's).
    """
    if samples is None:
        if n_samples < 1:
            raise SyntheticError(f"recovery: n_samples={n_samples}; score on at least one sample")
        samples = truth.sample(n_samples, seed=seed)
    acc = _Accumulator(truth, decoder, settings or ScoreSettings())
    with torch.no_grad():
        for start in range(0, len(samples), batch_size):
            x = samples.x[start : start + batch_size]
            z_hat = encode(x)
            acc.update(samples.z[start : start + batch_size], z_hat, x, decode(z_hat) if decode is not None else None)
    return acc.report()


def score_dictionary(
    truth: GroundTruth,
    dictionary: Dictionary,
    samples: Samples | None = None,
    n_samples: int = 8192,
    settings: ScoreSettings | None = None,
) -> RecoveryReport:
    """Score an lmscope dictionary (it takes raw activations: the trainer folds its normalisation in)."""
    dictionary = dictionary.eval()
    dev = next(dictionary.parameters()).device

    def encode(x: Tensor) -> Tensor:
        return dictionary.encode(x.to(dev))

    def decode(z: Tensor) -> Tensor:
        return dictionary.decode(z)

    return score(truth, dictionary.decoder_directions.detach(), encode, decode, samples, n_samples, settings=settings)
