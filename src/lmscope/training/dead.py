"""Dead-latent tracking: a latent is dead when it has not fired on any of the last `window` tokens."""

from __future__ import annotations

import torch
from torch import Tensor


class DeadTracker:
    def __init__(self, d_sae: int, window_tokens: int) -> None:
        self.window = int(window_tokens)
        self.since_fired = torch.zeros(d_sae, dtype=torch.long)  # tokens since each latent last fired
        self.fired_total = torch.zeros(d_sae, dtype=torch.float64)  # firing counts since the last reset
        self.tokens_total = 0

    def update(self, fired: Tensor, n_tokens: int) -> None:
        """`fired` [d_sae]: on how many of the batch's `n_tokens` tokens each latent fired."""
        fired = fired.detach().to("cpu")
        self.since_fired += n_tokens
        self.since_fired[fired > 0] = 0
        self.fired_total += fired.double()
        self.tokens_total += n_tokens

    def dead_mask(self) -> Tensor:
        return self.since_fired >= self.window

    def dead_fraction(self) -> float:
        return float(self.dead_mask().float().mean())

    def densities(self) -> Tensor:
        """Firing frequency of each latent since the last `reset_densities`."""
        return self.fired_total / max(1, self.tokens_total)

    def reset_densities(self) -> None:
        self.fired_total.zero_()
        self.tokens_total = 0

    def state(self) -> dict[str, Tensor]:
        return {
            "since_fired": self.since_fired.clone(),
            "fired_total": self.fired_total.clone(),
            "tokens_total": torch.tensor(self.tokens_total, dtype=torch.long),
        }

    def load(self, state: dict[str, Tensor]) -> None:
        self.since_fired = state["since_fired"].clone().long()
        self.fired_total = state["fired_total"].clone().double()
        self.tokens_total = int(state["tokens_total"])
