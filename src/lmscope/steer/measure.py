"""Run baseline vs steered generations side by side and measure the steering's effect.

For S samples (seeds seed, seed+1, ...) each seed generates once without and once with the edit. With
`measure`, it reports:
- the steered target's mean activation over the generated tokens, read back by a *clean* forward pass
  (no edit) over prompt + continuation, for baseline and steered continuations;
- KL(steered || baseline) of the next-token distribution at the first generated position;
- perplexity of the continuations under the unsteered model: the fluency cost of the edit.
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
from lmscope.model.generation import SamplingConfig, generate
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
) -> SteeringResult:
    """Generate baseline and steered continuations from the same seeds; measure when `readout` is given."""
    result = SteeringResult(prompt=prompt_text, edits=edits)
    decode = model.tokenizer.decode
    for s in range(samples):
        base = generate(model, prompt, sampling, seed + s)
        with model.intervene(writers):
            steered = generate(model, prompt, sampling, seed + s)
        result.samples.append(
            Sample(
                seed + s,
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
