"""Find a feature whose clamp turns the model's behaviour towards its own tokens, and measure how far, over seeds.

The demo ends with a steering command; this search picks it, in a fixed amount of seeded work sized to about a
minute on two CPU cores (`SteerSearchConfig`):

1. Candidates: live features in a density band, densest first, each with its *own tokens*: those its top
   examples peak on, plus its top direct logit effects unless they are generic (in the top-10 list of many
   features); whitespace-only and special tokens are dropped. (At the demo's layer 10 a feature's direct logit
   effects, and how coherent they look, say nothing about what its clamp does; denser features move the model
   more.)
2. Screen: one batched forward pass per candidate with the feature clamped to `screen_strength` x its observed
   max: how much next-token probability moves onto its own tokens at the first generated position. This is the
   feature's *total* logit effect on the prompt, through every later layer.
3. Search: for the best-screened candidates at each strength (weakest first; a stronger one only while the
   rise is positive and the fluency cost within bounds), `samples` sampled continuations in one seeded batch,
   with and without the clamp (the same random numbers), and per continuation the rate of the feature's tokens.
   A trial qualifies when the paired-t interval of the per-sample rises lies above 0 and its fluency cost (the
   mean NLL per token of the steered text under the unsteered model, minus the baseline's) is at most
   `max_nll_rise`. The largest mean rise wins.
4. Confirm: the winner is measured again on a fresh seed exactly as `lmscope steer ... --samples S --seed SEED
   --batch --measure` does, so the figures reported are not the search's luckiest draw and the printed command
   reproduces the texts, perplexities and KL. If it does not hold up, the next qualifier is tried.

Sampling is batched throughout (`sample_batch`: S rows of one seeded generation, the same random numbers with and
without the clamp), several times faster than one generation per seed on a CPU.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from lmscope.core.progress import ProgressCallback, ProgressEvent, emit
from lmscope.dictionaries.base import Dictionary
from lmscope.model.adapter import Model
from lmscope.model.generation import SamplingConfig, prompt_ids, sample_batch
from lmscope.steer.edits import Edit, feature_readout, latent_edit_writer
from lmscope.steer.measure import Rise, paired_rise, rate_of, run_steering, sample_token_rates

STEER_PROMPT = "Here is a short example:"
TASK = "steering search"


@dataclass(frozen=True)
class SteerSearchConfig:
    """The work the search does: fixed and seeded, so two runs on one atlas pick the same feature."""

    prompt: str = STEER_PROMPT
    pool: int = 512  # candidates screened, densest first
    min_density: float = 1e-4
    max_density: float = 0.05
    screen_strength: float = 6.0  # x the observed max activation, for the one-token screen
    finalists: int = 6  # the best-screened candidates tried with sampling
    strengths: tuple[float, ...] = (3.0, 6.0)  # x the observed max activation, weakest first
    samples: int = 16  # continuations per trial and in the confirmation (rows of one batch)
    max_new_tokens: int = 16
    temperature: float = 0.8
    seed: int = 0  # the search's batches
    confirm_seed: int = 100  # the confirmation's batch
    confirm_tries: int = 2  # qualifiers confirmed at most, best first
    max_nll_rise: float = 2.0  # the fluency cost allowed, in nats per generated token
    from_prompt_end: bool = True  # clamp from the prompt's last token on (the prompt is read as it is)
    seconds: float = 60.0  # no new trial starts after this; the confirmation follows
    # torch threads while searching (None: as they are). One: the search's small batched steps gain little from
    # a second thread on 2 cores, and become many times slower when another job shares the cores.
    threads: int | None = 1
    screen_tokens: int = 1536  # prompt tokens per screening batch

    @classmethod
    def quick(cls) -> SteerSearchConfig:
        """A smaller search (tens of seconds on 2 CPU cores), for smoke runs (`lmscope demo --quick`)."""
        return cls(pool=64, finalists=2, max_new_tokens=12, confirm_tries=1, seconds=20)


@dataclass(frozen=True)
class Candidate:
    feature: int
    max_act: float
    tokens: frozenset[int]  # the feature's own tokens
    density: float = 0.0
    label: str | None = None


@dataclass
class Trial:
    """One feature at one strength, over the search's batch of samples."""

    feature: int
    multiple: float  # x the observed max
    value: float  # the clamp value
    screen_rise: float  # next-token probability moved onto its tokens by the screen
    rise: Rise
    nll_baseline: float  # mean NLL per token under the unsteered model
    nll_steered: float

    @property
    def nll_rise(self) -> float:
        return self.nll_steered - self.nll_baseline

    def qualifies(self, max_nll_rise: float) -> bool:
        return self.rise.clearly_up() and self.nll_rise <= max_nll_rise

    def to_dict(self) -> dict[str, Any]:
        return {"feature": self.feature, "multiple": self.multiple, "value": self.value,
                "screen_rise": self.screen_rise, **_rise_dict(self.rise), "nll_baseline": self.nll_baseline,
                "nll_steered": self.nll_steered, "nll_rise": self.nll_rise}  # fmt: skip


def _rise_dict(r: Rise) -> dict[str, Any]:
    return {"baseline": r.baseline, "steered": r.steered, "rise": r.mean, "rise_low": r.low, "rise_high": r.high,
            "samples_up": r.up, "samples_down": r.down, "samples": r.n, "confidence": r.confidence}  # fmt: skip


# ---------------------------------------------------------------------------------------------------- candidates
def own_tokens(
    tokenizer: Any, peaks: Sequence[int], promoted: Sequence[int], generic: set[int] | frozenset[int] = frozenset()
) -> frozenset[int]:
    """A feature's own tokens: the tokens it peaks on and those it promotes (less generic ones), without
    whitespace-only and special tokens."""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    ids = set(peaks) | (set(promoted) - set(generic))
    return frozenset(t for t in ids if t not in special and tokenizer.decode([t]).strip())


def atlas_candidates(conn: Any, tokenizer: Any, cfg: SteerSearchConfig) -> list[Candidate]:
    """The live features of an atlas in the density band with logit effects, densest first, at most `cfg.pool`."""
    from lmscope.atlas.db.labels import shown_labels
    from lmscope.atlas.db.read import count_features, densities, strong_features

    density = densities(conn)
    rows: dict[int, tuple[float, list[int], list[int]]] = {}
    for fid, max_act, logits, peaks in strong_features(conn, count_features(conn), cfg.min_density, cfg.max_density):
        promoted = [int(t) for t, _ in json.loads(logits)["positive"][:10]]
        rows.setdefault(int(fid), (float(max_act), [int(t) for t in (peaks or "").split(",") if t], promoted))
    # A token in the top-10 list of many features says nothing about any one of them.
    counts = Counter(t for _, _, promoted in rows.values() for t in promoted)
    generic = {t for t, c in counts.items() if c > max(5, len(rows) // 200)}
    out = [
        Candidate(fid, max_act, own_tokens(tokenizer, peaks, promoted, generic), density[fid])
        for fid, (max_act, peaks, promoted) in rows.items()
        if max_act > 0
    ]
    out = sorted((c for c in out if c.tokens), key=lambda c: (-c.density, c.feature))[: cfg.pool]
    labels = shown_labels(conn, [c.feature for c in out])
    return [Candidate(c.feature, c.max_act, c.tokens, c.density, labels.get(c.feature, {}).get("text")) for c in out]


# ---------------------------------------------------------------------------------------------------- screen
def _rowwise_clamp(dictionary: Dictionary, features: Tensor, values: Tensor, from_prompt_end: bool) -> Any:
    """Row b of the batch gets feature features[b] clamped to values[b] (error term kept)."""

    def write(x: Tensor) -> Tensor:
        w_dec = dictionary.W_dec
        with torch.no_grad():
            z = dictionary.encode(x.to(w_dec.dtype))
        f = features.to(z.device)
        current = z.gather(-1, f.view(-1, 1, 1).expand(-1, x.shape[-2], 1)).squeeze(-1)  # [B, T]
        delta = (values.to(z.device, z.dtype).view(-1, 1) - current).unsqueeze(-1) * w_dec[f].unsqueeze(1)
        if from_prompt_end and x.shape[-2] > 1:
            delta[:, :-1] = 0
        return x + delta.to(x.dtype)

    return write


def screen(
    model: Model,
    dictionary: Dictionary,
    hook: str,
    ids: Tensor,
    candidates: Sequence[Candidate],
    multiple: float,
    from_prompt_end: bool = True,
    batch_tokens: int = 1536,
) -> list[float]:
    """For each candidate clamped to `multiple` x its max: the next-token probability that moves onto its own
    tokens at the first generated position (steered minus unsteered)."""
    base = model(ids)
    assert base is not None
    p_base = base[0, -1].float().softmax(-1)
    batch = max(1, batch_tokens // ids.shape[-1])
    out: list[float] = []
    for s in range(0, len(candidates), batch):
        chunk = candidates[s : s + batch]
        feats = torch.tensor([c.feature for c in chunk], dtype=torch.long)
        values = torch.tensor([multiple * c.max_act for c in chunk])
        writer = _rowwise_clamp(dictionary, feats, values, from_prompt_end)
        with model.intervene({hook: writer}):
            logits = model(ids.repeat(len(chunk), 1).to(model.device))
        assert logits is not None
        p = logits[:, -1].float().softmax(-1)
        for c, row in zip(chunk, p, strict=True):
            toks = torch.tensor(sorted(c.tokens), dtype=torch.long, device=row.device)
            out.append(float(row[toks].sum() - p_base[toks].sum()))
    return out


# ---------------------------------------------------------------------------------------------------- search
def _mean_nll(model: Model, ids: Tensor, rows: Sequence[Tensor]) -> float:
    """The mean over `rows` of each continuation's mean NLL per token after `ids` under the model as it is (one
    right-padded batch: what `continuation_nll` gives row by row)."""
    rows = [r for r in rows if r.numel()]
    if not rows:
        return float("nan")
    t, width = ids.shape[-1], max(len(r) for r in rows)
    full = torch.zeros(len(rows), t + width, dtype=torch.long)
    mask = torch.zeros_like(full)
    for i, r in enumerate(rows):
        full[i, :t], full[i, t : t + len(r)] = ids[0].cpu(), r
        mask[i, : t + len(r)] = 1
    logits = model(full.to(model.device), attention_mask=mask.to(model.device))
    assert logits is not None
    logp = logits[:, t - 1 : -1].float().log_softmax(-1)
    nll = -logp.gather(-1, full[:, t:].to(logp.device).unsqueeze(-1)).squeeze(-1).cpu()
    keep = mask[:, t:].float()
    return float(((nll * keep).sum(1) / keep.sum(1)).mean())


def _clamp(multiple: float, max_act: float) -> float:
    return round(multiple * max_act, 1)


def search_steering(
    model: Model,
    dictionary: Dictionary,
    hook: str,
    candidates: Sequence[Candidate],
    cfg: SteerSearchConfig | None = None,
    progress: ProgressCallback | None = None,
) -> dict[str, Any]:
    """Screen, search and confirm (module docstring). The result: `found` (a confirmed feature), the chosen
    feature's confirmed figures, both texts of its first seed, and the search's own record (`search`)."""
    cfg = cfg or SteerSearchConfig()
    before = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _search(model, dictionary, hook, candidates, cfg, progress)
    finally:
        torch.set_num_threads(before)


def _search(
    model: Model,
    dictionary: Dictionary,
    hook: str,
    candidates: Sequence[Candidate],
    cfg: SteerSearchConfig,
    progress: ProgressCallback | None,
) -> dict[str, Any]:
    start = time.perf_counter()
    ids = prompt_ids(model, cfg.prompt)
    sampling = SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature)
    record: dict[str, Any] = {"config": asdict(cfg), "candidates": len(candidates)}
    total = 1 + cfg.finalists * len(cfg.strengths) + cfg.confirm_tries
    step = 0

    def report(stats: str, finished: bool = False) -> None:
        emit(progress, ProgressEvent(TASK, step, total, "steps", stats, finished))

    report("screening")
    rises = screen(model, dictionary, hook, ids, candidates, cfg.screen_strength, cfg.from_prompt_end,
                   cfg.screen_tokens)  # fmt: skip
    order = sorted(range(len(candidates)), key=lambda i: (-rises[i], candidates[i].feature))
    # Those that moved probability onto their tokens at all; if none did, the least bad, so there is a figure.
    finalists = [(candidates[i], rises[i]) for i in order[: cfg.finalists] if rises[i] > 0] or [
        (candidates[i], rises[i]) for i in order[:1]
    ]
    record["screen_seconds"] = time.perf_counter() - start
    record["screened"] = [{"feature": c.feature, "screen_rise": r} for c, r in finalists]
    step += 1
    report(f"{len(finalists)} finalists")

    base_rows = sample_batch(model, ids, sampling, cfg.seed, cfg.samples)
    nll_base = _mean_nll(model, ids, base_rows)
    trials: list[Trial] = []
    stopped = False
    for cand, screen_rise in finalists:
        for multiple in cfg.strengths:
            if trials and time.perf_counter() - start > cfg.seconds:  # past the cap: no new trial (one at least)
                stopped = True
                break
            value = _clamp(multiple, cand.max_act)
            writer = latent_edit_writer(dictionary, [Edit(cand.feature, "clamp", value)], None, cfg.from_prompt_end)
            with model.intervene({hook: writer}):
                rows = sample_batch(model, ids, sampling, cfg.seed, cfg.samples)
            pairs = [(rate_of(b.tolist(), cand.tokens), rate_of(r.tolist(), cand.tokens))
                     for b, r in zip(base_rows, rows, strict=True)]  # fmt: skip
            trial = Trial(cand.feature, multiple, value, screen_rise, paired_rise(pairs), nll_base,
                          _mean_nll(model, ids, rows))  # fmt: skip
            trials.append(trial)
            step += 1
            report(f"feature {cand.feature} x{multiple:g}: rise {trial.rise.mean:+.0%}, NLL {trial.nll_rise:+.2f}")
            if trial.rise.mean <= 0 or trial.nll_rise > cfg.max_nll_rise:
                break  # a stronger clamp of a feature that did not raise its tokens, or already cost too much: skip
        if stopped:
            break
    record.update(trials=[t.to_dict() for t in trials], stopped_at_time_cap=stopped,
                  search_seconds=time.perf_counter() - start)  # fmt: skip

    by_feature = {c.feature: c for c, _ in finalists}
    qualified = sorted((t for t in trials if t.qualifies(cfg.max_nll_rise)), key=lambda t: -t.rise.mean)
    # Nothing qualified: confirm the most promising trial anyway, so the figures reported are reproducible.
    to_confirm = qualified[: cfg.confirm_tries] or sorted(trials, key=lambda t: -t.rise.low)[:1]
    chosen: dict[str, Any] | None = None
    for trial in to_confirm:
        step += 1
        report(f"confirming feature {trial.feature} on a fresh batch")
        result = confirm(model, dictionary, hook, by_feature[trial.feature], trial, cfg)
        if chosen is None or (result["found"] and not chosen["found"]):
            chosen = result
        if result["found"]:
            break
    record["seconds"] = time.perf_counter() - start
    step = total
    report("done", finished=True)
    if chosen is None:
        return {"found": False, "search": record}
    return {**chosen, "search": record}


def confirm(
    model: Model, dictionary: Dictionary, hook: str, cand: Candidate, trial: Trial, cfg: SteerSearchConfig
) -> dict[str, Any]:
    """Measure one trial again on a fresh seed, as `lmscope steer --samples S --seed SEED --batch --measure` does."""
    edit = Edit(cand.feature, "clamp", trial.value)
    writer = latent_edit_writer(dictionary, [edit], None, cfg.from_prompt_end)
    sampling = SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature)
    label = f"feature {cand.feature}=clamp:{trial.value:g}"  # as `lmscope steer` labels it
    result = run_steering(
        model, {hook: writer}, cfg.prompt, prompt_ids(model, cfg.prompt), [label], sampling, samples=cfg.samples,
        seed=cfg.confirm_seed, readout=feature_readout(dictionary, hook, [cand.feature]), batch=True,
    )  # fmt: skip
    assert result.measure is not None
    m = result.measure
    rise = paired_rise(sample_token_rates(result, cand.tokens))
    nll_rise = math.log(m["perplexity_steered"]) - math.log(m["perplexity_baseline"])
    hits = Counter(t for s in result.samples for t in s.steered_ids if t in cand.tokens)
    shown = [t for t, _ in hits.most_common(6)] or sorted(cand.tokens)[:6]
    first = result.samples[0]
    return {
        "found": rise.clearly_up() and nll_rise <= cfg.max_nll_rise,
        "feature": cand.feature, "label": cand.label, "max_act": cand.max_act, "density": cand.density,
        "multiple": trial.multiple, "value": trial.value, "from_prompt_end": cfg.from_prompt_end,
        "prompt": cfg.prompt, "seed": cfg.confirm_seed, "max_new_tokens": cfg.max_new_tokens,
        "temperature": cfg.temperature,
        **_rise_dict(rise),
        "per_sample": [[b, s] for b, s in sample_token_rates(result, cand.tokens)],
        "tokens": [model.tokenizer.decode([t]) for t in shown], "token_count": len(cand.tokens),
        "perplexity_baseline": m["perplexity_baseline"], "perplexity_steered": m["perplexity_steered"],
        "nll_rise": nll_rise, "kl": m["kl_first_position"],
        "activation_baseline": m["activation_baseline"].get(f"feature {cand.feature}"),
        "activation_steered": m["activation_steered"].get(f"feature {cand.feature}"),
        "baseline_text": first.baseline, "steered_text": first.steered,
        "search_trial": trial.to_dict(),
    }  # fmt: skip


def steer_command(model_spec: str, dict_dir: Any, found: dict[str, Any]) -> str:
    """The `lmscope steer` command that reproduces a confirmation's texts, perplexities and KL."""
    import shlex

    return (
        f"lmscope steer {model_spec} --dict {dict_dir} --feature {found['feature']}=clamp:{found['value']:g} "
        f"--prompt {shlex.quote(found['prompt'])}"
        + (" --from-prompt-end" if found["from_prompt_end"] else "")
        + f" --max-new-tokens {found['max_new_tokens']} --temperature {found['temperature']:g} "
        f"--samples {found['samples']} --seed {found['seed']} --batch --measure"
    )
