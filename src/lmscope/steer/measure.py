"""Run baseline vs steered generations side by side and measure the steering's effect.

For S samples (seeds seed, seed+1, ...) each seed generates once without and once with the edit; with `batch`,
the S samples are the rows of one batched generation per side, seeded once with `seed` (several times faster on a
CPU; both sides still draw the same random numbers). With `measure`, it reports:
- the steered target's mean activation over the generated tokens, read back by a *clean* forward pass
  (no edit) over prompt + continuation, for baseline and steered continuations;
- KL(steered || baseline) of the next-token distribution at the first generated position;
- perplexity of the continuations under the unsteered model: the fluency cost of the edit.

`sample_token_rates` and `paired_rise` say whether an edit makes tokens of interest more frequent, per seed and
with an interval, rather than from one pooled rate.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

from lmscope.model.adapter import Model
from lmscope.model.generation import SamplingConfig, generate, sample_batch
from lmscope.model.hooks import Writer

# Reads the steered target's value per token from a clean forward pass: ids [1, T] -> {name: values [T]}
Readout = Callable[[Model, Tensor], dict[str, Tensor]]


@dataclass
class Sample:
    seed: int
    baseline: str
    steered: str
    baseline_ids: list[int]
    steered_ids: list[int]


@dataclass
class SteeringResult:
    prompt: str
    edits: list[str]
    samples: list[Sample] = field(default_factory=list)
    measure: dict[str, Any] | None = None
    batched: bool = False  # the samples are the rows of one batched generation per side, all from `seed`

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def continuation_nll(model: Model, prompt: Tensor, new: Tensor) -> float:
    """Mean negative log-likelihood of `new` after `prompt` under the (unedited) model."""
    if new.numel() == 0:
        return float("nan")
    full = torch.cat([prompt[0].cpu(), new]).unsqueeze(0)
    logits = model(full)
    assert logits is not None
    logp = logits[0, prompt.shape[-1] - 1 : -1].float().log_softmax(-1)
    return float(-logp.gather(-1, new.to(logp.device).unsqueeze(-1)).mean())


Edits = Mapping[str, Writer | Sequence[Writer]]


def first_position_kl(model: Model, prompt: Tensor, edits: Edits) -> float:
    """KL(steered || baseline) between next-token distributions at the first generated position."""
    base = model(prompt)
    with model.intervene(edits):
        steered = model(prompt)
    assert base is not None and steered is not None
    lp_b = base[0, -1].float().log_softmax(-1)
    lp_s = steered[0, -1].float().log_softmax(-1)
    return float((lp_s.exp() * (lp_s - lp_b)).sum())


def _mean_readout(model: Model, prompt: Tensor, new: Tensor, readout: Readout) -> dict[str, float]:
    if new.numel() == 0:
        return {}
    full = torch.cat([prompt[0].cpu(), new]).unsqueeze(0)
    values = readout(model, full)
    return {k: float(v[prompt.shape[-1] :].float().mean()) for k, v in values.items()}


def run_steering(
    model: Model,
    writers: Edits,
    prompt_text: str,
    prompt: Tensor,
    edits: list[str],
    sampling: SamplingConfig,
    samples: int = 1,
    seed: int = 0,
    readout: Readout | None = None,
    batch: bool = False,
) -> SteeringResult:
    """Generate baseline and steered continuations from the same seeds; measure when `readout` is given."""
    result = SteeringResult(prompt=prompt_text, edits=edits, batched=batch)
    decode = model.tokenizer.decode
    if batch:
        bases = sample_batch(model, prompt, sampling, seed, samples)
        with model.intervene(writers):
            steereds = sample_batch(model, prompt, sampling, seed, samples)
        pairs = [(seed, b, st) for b, st in zip(bases, steereds, strict=True)]
    else:
        pairs = []
        for s in range(samples):
            base = generate(model, prompt, sampling, seed + s)
            with model.intervene(writers):
                steered = generate(model, prompt, sampling, seed + s)
            pairs.append((seed + s, base, steered))
    for smp_seed, base, steered in pairs:
        result.samples.append(
            Sample(
                smp_seed,
                decode(base, skip_special_tokens=True),
                decode(steered, skip_special_tokens=True),
                base.tolist(),
                steered.tolist(),
            )
        )
    if readout is None:
        return result
    reads_b: dict[str, list[float]] = {}
    reads_s: dict[str, list[float]] = {}
    nll_b, nll_s = [], []
    for smp in result.samples:
        b, st = torch.tensor(smp.baseline_ids, dtype=torch.long), torch.tensor(smp.steered_ids, dtype=torch.long)
        for k, v in _mean_readout(model, prompt, b, readout).items():
            reads_b.setdefault(k, []).append(v)
        for k, v in _mean_readout(model, prompt, st, readout).items():
            reads_s.setdefault(k, []).append(v)
        nll_b.append(continuation_nll(model, prompt, b))
        nll_s.append(continuation_nll(model, prompt, st))

    def ppl(nlls: list[float]) -> float:
        good = [x for x in nlls if not math.isnan(x)]
        return math.exp(statistics.fmean(good)) if good else float("nan")

    result.measure = {
        "activation_baseline": {k: statistics.fmean(v) for k, v in reads_b.items()},
        "activation_steered": {k: statistics.fmean(v) for k, v in reads_s.items()},
        "kl_first_position": first_position_kl(model, prompt, writers),
        "perplexity_baseline": ppl(nll_b),
        "perplexity_steered": ppl(nll_s),
        "samples": samples,
    }
    return result


def token_rate(result: SteeringResult, token_ids: set[int]) -> tuple[float, float]:
    """Fraction of generated tokens that are in `token_ids`, in (baseline, steered) continuations."""

    def rate(seqs: list[list[int]]) -> float:
        n = sum(len(x) for x in seqs)
        return sum(t in token_ids for x in seqs for t in x) / n if n else 0.0

    return rate([s.baseline_ids for s in result.samples]), rate([s.steered_ids for s in result.samples])


def sample_token_rates(result: SteeringResult, token_ids: set[int] | frozenset[int]) -> list[tuple[float, float]]:
    """Per sample (seed): the fraction of its generated tokens that are in `token_ids`, (baseline, steered)."""
    return [(rate_of(s.baseline_ids, token_ids), rate_of(s.steered_ids, token_ids)) for s in result.samples]


def rate_of(ids: Sequence[int], token_ids: set[int] | frozenset[int]) -> float:
    """The fraction of `ids` that are in `token_ids` (0 for no ids)."""
    return sum(int(t) in token_ids for t in ids) / len(ids) if len(ids) else 0.0


@dataclass(frozen=True)
class Rise:
    """The rise of a per-sample figure under an edit, over paired samples (the same seed with and without)."""

    baseline: float  # mean over samples
    steered: float
    mean: float  # mean of the per-sample differences (= steered - baseline)
    low: float  # two-sided interval of the mean difference (paired t); equal to mean for one sample
    high: float
    up: int  # samples where the edit raised the figure
    down: int  # ... and where it lowered it
    n: int
    confidence: float

    def clearly_up(self) -> bool:
        """The interval lies above zero: a rise that the seed-to-seed noise does not explain."""
        return self.n > 1 and self.low > 0


def paired_rise(pairs: Sequence[tuple[float, float]], confidence: float = 0.95) -> Rise:
    """Mean rise of `steered` over `baseline` across (baseline, steered) pairs, with a paired-t interval and the
    counts of samples that rose and fell."""
    if not pairs:
        raise ValueError("paired_rise needs at least one (baseline, steered) pair")
    diffs = [s - b for b, s in pairs]
    n, mean = len(diffs), statistics.fmean(diffs)
    half = 0.0
    if n > 1:
        from scipy.stats import t

        half = float(t.ppf(0.5 + confidence / 2, n - 1)) * statistics.stdev(diffs) / math.sqrt(n)
    return Rise(
        baseline=statistics.fmean(b for b, _ in pairs),
        steered=statistics.fmean(s for _, s in pairs),
        mean=mean,
        low=mean - half,
        high=mean + half,
        up=sum(d > 0 for d in diffs),
        down=sum(d < 0 for d in diffs),
        n=n,
        confidence=confidence,
    )
