"""Whether a training run or a finished dictionary is sick: pure checks over the figures the trainer logs.

A run is flagged when
- `nonfinite`: the loss is NaN or infinite;
- `diverging`: the reconstruction error (the `mse` term) rose `diverge_factor` times above its lowest value over
  the last `window` log lines;
- `fvu`: FVU exceeds 1 (the reconstruction is worse than predicting the mean activation);
- `l0`: L0 is more than `l0_factor` times off its target (cfg.target_l0, or k for TopK / BatchTopK); without a
  target, when more than half the input width fires (hardly sparse) or under one latent per token;
- `dead_rising`: the dead fraction climbed by `dead_rise` (absolute) over the window; `dead_high`: it is at least
  `dead_max`.
FVU and L0 are judged only after the first `grace` of training (an untrained dictionary is neither), and L0 against
a `target_l0` only after `target_grace` (its controller approaches the target from above, over much of the run).
`HealthMonitor` follows one run's log lines and says which warnings are new; `check_eval` judges a finished
dictionary from `lmscope eval`'s results with the same thresholds.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from lmscope.dictionaries.base import DictConfig, architecture


@dataclass(frozen=True)
class HealthSettings:
    fvu_max: float = 1.0
    diverge_factor: float = 10.0
    l0_factor: float = 2.0
    dense_frac: float = 0.5  # without a target: L0 above this fraction of d_in is not sparse
    dead_rise: float = 0.1
    dead_max: float = 0.5
    window: int = 10  # log lines the rising checks look back over
    grace: float = 0.1  # fraction of training before FVU and L0 are judged
    target_grace: float = 0.5  # with a target L0 (cfg.target_l0), L0 waits for its controller this long


@dataclass(frozen=True)
class HealthWarning:
    code: str  # nonfinite, diverging, fvu, l0, dead_rising, dead_high
    message: str

    def __str__(self) -> str:
        return self.message


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and math.isfinite(v)


def check_fvu(fvu: float | None, s: HealthSettings) -> HealthWarning | None:
    if fvu is not None and _finite(fvu) and fvu > s.fvu_max:
        return HealthWarning(
            "fvu", f"FVU {fvu:.3f} exceeds {s.fvu_max:g}: the reconstruction is worse than predicting the mean "
            "activation; lower the learning rate or check the inputs' scale",
        )  # fmt: skip
    return None


def check_l0(l0: float | None, cfg: DictConfig, s: HealthSettings) -> HealthWarning | None:
    """L0 against the dictionary's target (cfg.target_l0, or k); without one, against the input width."""
    if l0 is None or not _finite(l0):
        return None
    cls = architecture(cfg.arch)
    target = cls.target_l0(cfg)
    knob = cls.sparsity_param
    if target is None:
        if l0 > s.dense_frac * cfg.d_in:
            return HealthWarning(
                "l0", f"L0 {l0:.1f} is more than {s.dense_frac:.0%} of the input width {cfg.d_in}: hardly sparse; "
                f"raise {knob} or set a target L0 (--target-l0)",
            )  # fmt: skip
        if l0 < 1:
            return HealthWarning(
                "l0", f"L0 {l0:.2f}: under one latent per token fires; lower {knob} or set a target L0 (--target-l0)"
            )
        return None
    ratio = l0 / target
    if ratio > s.l0_factor or ratio < 1 / s.l0_factor:
        how = "above" if ratio > 1 else "below"
        fix = (
            "the controller has not reached it: train longer or start nearer (--l1 / --l0)"
            if cfg.target_l0 is not None
            else "the inference threshold does not give k"
        )
        return HealthWarning("l0", f"L0 {l0:.1f} is {max(ratio, 1 / ratio):.1f}x {how} its target {target:g}; {fix}")
    return None


def check_dead(dead: float | None, s: HealthSettings) -> HealthWarning | None:
    if dead is not None and _finite(dead) and dead >= s.dead_max:
        return HealthWarning(
            "dead_high", f"{dead:.0%} of the latents are dead; lower the learning rate or the sparsity, or train on "
            "more tokens",
        )  # fmt: skip
    return None


def check_eval(
    results: Mapping[str, Any], cfg: DictConfig, settings: HealthSettings | None = None
) -> list[HealthWarning]:
    """Warnings for a finished dictionary from its evaluation results (fvu, l0, dead_frac as `evaluate` gives)."""
    s = settings or HealthSettings()
    found = [
        check_fvu(results.get("fvu"), s),
        check_l0(results.get("l0"), cfg, s),
        check_dead(results.get("dead_frac"), s),
    ]
    return [w for w in found if w is not None]


def check_history(
    records: list[Mapping[str, Any]], cfg: DictConfig, progress: float, settings: HealthSettings | None = None
) -> list[HealthWarning]:
    """Warnings for a run from its log lines so far (the last one is the latest); `progress` is in [0, 1]."""
    s = settings or HealthSettings()
    if not records:
        return []
    last = records[-1]
    recent = records[-s.window :]
    out: list[HealthWarning | None] = []
    loss = last.get("loss")
    if loss is not None and not _finite(loss):
        out.append(HealthWarning("nonfinite", f"the loss is {loss}: training diverged; lower the learning rate"))
    mses = [r["mse"] for r in recent if _finite(r.get("mse"))]
    if len(mses) >= 2 and _finite(last.get("mse")) and min(mses) > 0 and last["mse"] > s.diverge_factor * min(mses):
        out.append(
            HealthWarning(
                "diverging",
                f"the reconstruction error rose {last['mse'] / min(mses):.0f}x over the last "
                f"{len(mses)} log lines: training is diverging; lower the learning rate",
            )
        )
    if progress >= s.grace:
        out.append(check_fvu(last.get("fvu"), s))
    if progress >= (s.target_grace if cfg.target_l0 is not None else s.grace):
        out.append(check_l0(last.get("l0"), cfg, s))
    deads = [r["dead_frac"] for r in recent if _finite(r.get("dead_frac"))]
    if deads and deads[-1] - min(deads) >= s.dead_rise:
        out.append(
            HealthWarning(
                "dead_rising",
                f"the dead fraction climbed from {min(deads):.1%} to {deads[-1]:.1%} over the last "
                f"{len(deads)} log lines; lower the learning rate or the sparsity",
            )
        )
    out.append(check_dead(last.get("dead_frac"), s))
    return [w for w in out if w is not None]


class HealthMonitor:
    """Follows one run's log lines: the warnings that hold now, and which of them are new since the last line."""

    def __init__(self, cfg: DictConfig, settings: HealthSettings | None = None) -> None:
        self.cfg = cfg
        self.settings = settings or HealthSettings()
        self.records: deque[Mapping[str, Any]] = deque(maxlen=self.settings.window)
        self.active: list[HealthWarning] = []
        self.raised: list[dict[str, Any]] = []  # every warning when it first appeared: step, code, message

    def observe(self, record: Mapping[str, Any], progress: float) -> list[HealthWarning]:
        """Add a log line; return the warnings that were not active at the previous one."""
        self.records.append(record)
        before = {w.code for w in self.active}
        self.active = check_history(list(self.records), self.cfg, progress, self.settings)
        new = [w for w in self.active if w.code not in before]
        self.raised += [{"step": record.get("step"), "code": w.code, "message": w.message} for w in new]
        return new

    def restore(self, records: list[Mapping[str, Any]], total_steps: int) -> None:
        """Pick up after a resume from the run's log lines up to its checkpoint (as `log` wrote them): the same
        history, active warnings and raised list as if it had never stopped."""
        for r in records:
            self.raised += [{"step": r.get("step"), **w} for w in r.get("raised", [])]
        self.records.extend(records[-self.settings.window :])
        if records:
            progress = float(records[-1].get("step", 0)) / max(1, total_steps)
            self.active = check_history(list(self.records), self.cfg, progress, self.settings)

    def log(self, record: dict[str, Any], progress: float) -> list[HealthWarning]:
        """`observe`, then write the health line (and the warnings raised here) into the record itself."""
        new = self.observe(record, progress)
        record["health"] = self.line()
        if new:
            record["raised"] = [{"code": w.code, "message": w.message} for w in new]
        return new

    def line(self) -> str:
        """`ok`, or the warnings that hold now, joined."""
        return "ok" if not self.active else "; ".join(w.message for w in self.active)

    def summary(self) -> dict[str, Any]:
        """What a saved dictionary records: the health line at the end and every warning raised on the way."""
        return {"line": self.line(), "raised": list(self.raised)}
