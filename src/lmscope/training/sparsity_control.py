"""A target L0 instead of a raw coefficient: a controller adjusts a dictionary's sparsity penalty during training.

A ReLU or JumpReLU dictionary's coefficient (l1_coeff, l0_coeff) gives a chosen L0 only at one data scale and
width; with `DictConfig.target_l0` set, the trainer asks this controller for each step's coefficient instead. It is
a proportional-integral controller in log space on the measured L0 (a batch's mean active latents per token):

    e_t  = log(L0_t / target), clipped to [-1, 1]        (the error: how many e-folds off the target)
    s_t  = smoothing * s_{t-1} + (1 - smoothing) * e_t   (an exponential average from 0: batches are noisy)
    I_t  = I_{t-1} + clamp(gain * s_t, -max_step, max_step)
    log c_t = log c_0 + I_t + p_gain * s_t               (c_0: the config's coefficient, where it starts)

Too many active latents raise the coefficient, too few lower it, by a bounded amount per step. L0 follows the
coefficient only after the weights have moved (tens of steps at a high learning rate, more at a low one), so the
gain is small: `horizon / total_steps` by default, bounded to [min_gain, max_gain]; the whole run can move the
coefficient by about `horizon` e-folds. The controller holds still over the first `hold` fraction of training,
while the architecture's own warmup ramps the penalty in (`l1_warmup_frac`), so it does not wind up on the L0 of an
untrained dictionary; with a TopK phase (dictionaries/topk_phase.py) it holds until the penalty has ramped in after
the phase, and its gain is paced to the steps left then. Start from a coefficient that gives *more* active latents
than the target: a ReLU latent pushed below zero everywhere by too strong a penalty never fires again, so L0 is best
approached from above.

The state is a few floats, saved in the trainer's checkpoint as JSON (floats round-trip exactly), so a killed and
resumed run continues bit for bit.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass
from typing import Any

from lmscope.dictionaries.base import DictConfig, DictionaryError, architecture


@dataclass(frozen=True)
class ControlSettings:
    horizon: float = 10.0  # integral gain = horizon / total_steps, bounded to [min_gain, max_gain]
    min_gain: float = 1e-3
    max_gain: float = 0.05
    p_gain: float = 0.3  # weight of the smoothed error itself (the proportional term)
    smoothing: float = 0.8  # of the error's exponential average
    max_step: float = 0.05  # the largest change of log(coefficient) the integral makes in one step
    max_error: float = 1.0  # the error is clipped to this many e-folds
    down: float = 3.0  # the integral falls this many times faster than it rises (L0 below target kills latents)
    start: float = 0.05  # the coefficient starts at this fraction of the config's, so L0 comes down to the target

    def gain(self, total_steps: int) -> float:
        return min(self.max_gain, max(self.min_gain, self.horizon / max(1, total_steps)))


class SparsityController:
    """Chooses the sparsity coefficient of each step from the L0 of the previous ones (see the module docstring)."""

    def __init__(
        self,
        target_l0: float,
        initial_coeff: float,
        total_steps: int,
        hold_steps: int = 0,
        settings: ControlSettings | None = None,
    ) -> None:
        if not (target_l0 > 0 and math.isfinite(target_l0)):
            raise DictionaryError(f"target_l0={target_l0}: it must be a positive number of active latents")
        if not (initial_coeff > 0 and math.isfinite(initial_coeff)):
            raise DictionaryError(
                f"the starting sparsity coefficient is {initial_coeff}; with a target L0 it must be positive (it is "
                "where the controller starts)"
            )
        self.target = float(target_l0)
        self.initial = float(initial_coeff)
        self.settings = settings or ControlSettings()
        self.gain = self.settings.gain(total_steps)
        self.hold = int(hold_steps)
        self.integral = 0.0
        self.error = 0.0  # the smoothed error
        self.steps = 0

    @property
    def coeff(self) -> float:
        """The coefficient for the next step."""
        return self.initial * self.settings.start * math.exp(self.integral + self.settings.p_gain * self.error)

    def update(self, l0: float) -> float:
        """Take a step's measured L0 (mean active latents per token); return the coefficient for the next step."""
        s = self.settings
        self.steps += 1
        if self.steps <= self.hold:
            return self.coeff
        raw = math.log(max(l0, 1e-3) / self.target) if math.isfinite(l0) else 0.0
        e = min(s.max_error, max(-s.max_error, raw))
        self.error = s.smoothing * self.error + (1 - s.smoothing) * e
        rate = self.gain * (s.down if self.error < 0 else 1.0)
        self.integral += min(s.max_step, max(-s.max_step, rate * self.error))
        return self.coeff

    def state(self) -> dict[str, Any]:
        """JSON-able state (what a checkpoint keeps)."""
        return {
            "target": self.target, "initial": self.initial, "gain": self.gain, "hold": self.hold,
            "integral": self.integral, "error": self.error, "steps": self.steps, "coeff": self.coeff,
            "settings": asdict(self.settings),
        }  # fmt: skip

    def load(self, state: dict[str, Any]) -> None:
        if not state:
            raise DictionaryError(
                "the checkpoint has no controller state for a run with a target L0; use another --out"
            )
        if float(state["target"]) != self.target:
            raise DictionaryError(
                f"the checkpoint's controller aims at L0 {state['target']:g}, this run at {self.target:g}; use "
                "another --out"
            )
        self.settings = ControlSettings(**state["settings"])
        self.initial, self.gain, self.hold = float(state["initial"]), float(state["gain"]), int(state["hold"])
        self.integral, self.error, self.steps = float(state["integral"]), float(state["error"]), int(state["steps"])


def controller_for(
    cfg: DictConfig, total_steps: int, settings: ControlSettings | None = None
) -> SparsityController | None:
    """The controller of a run whose config sets `target_l0` (None otherwise): it starts from the config's
    coefficient and holds still while the penalty ramps in (`l1_warmup_frac` of training)."""
    cls = architecture(cfg.arch)
    coeff = cls.controlled_coeff
    if cfg.target_l0 is None or coeff is None:
        return None
    # with a TopK phase the penalty applies only after it (ramping in from there): hold still until the ramp is done,
    # and pace the gain to the steps that are left then
    phase = float(cfg.token_topk_frac or 0.0) if cls.has_topk_phase else 0.0
    hold = math.ceil((phase + max(0.0, cfg.l1_warmup_frac)) * total_steps)
    active = max(1, total_steps - math.ceil(phase * total_steps))
    if phase > 0 and settings is None and cls.control_start_after_phase is not None:
        settings = dataclasses.replace(ControlSettings(), start=cls.control_start_after_phase)
    return SparsityController(float(cfg.target_l0), float(getattr(cfg, coeff)), active, hold, settings)
