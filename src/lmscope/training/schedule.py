"""Learning-rate schedule: linear warmup, a constant plateau, then linear decay over the last part."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Schedule:
    total_steps: int
    warmup_steps: int = 1000
    decay_frac: float = 0.2  # decay over the last 20% of steps (Anthropic's April 2024 recipe)
    min_frac: float = 0.0  # the LR at the very end, as a fraction of the peak

    def factor(self, step: int) -> float:
        """Multiplier of the peak LR for optimiser step `step` (0-based)."""
        total = max(1, self.total_steps)
        warm = min(self.warmup_steps, total)
        if warm > 0 and step < warm:
            return (step + 1) / warm
        decay_steps = round(self.decay_frac * total)
        start = total - decay_steps
        if decay_steps <= 0 or step < start:
            return 1.0
        done = min(1.0, (step - start + 1) / decay_steps)
        return 1.0 - (1.0 - self.min_frac) * done
