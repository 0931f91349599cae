"""An optimiser step after gradient clipping by global norm: `torch.nn.utils.clip_grad_norm_`'s rule, cheaper on a CPU.

The rule: every gradient is multiplied by min(1, max_norm / (|g| + 1e-6)), |g| the L2 norm of all gradients
together. `clip_grad_norm_` reads every gradient for the norm and then reads and writes every one again to scale it.
Here the norm skips what the caller already summed (the decoder's projection returns its squared norm from the same
pass, `Dictionary.remove_parallel_grad`), and the scaling is skipped when the factor is 1 or handed to the
optimiser where it can apply it while it reads each gradient anyway: torch's fused Adam takes a `grad_scale` to
divide gradients by (the protocol of `torch.amp.GradScaler`: an attribute set for one step). Otherwise the
gradients are scaled in place, as `clip_grad_norm_` does.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor


def clipped_step(
    opt: torch.optim.Optimizer,
    params: Sequence[Tensor],
    max_norm: float | None,
    known_sq: Mapping[int, float] | None = None,
) -> float | None:
    """`opt.step()` with the gradients of `params` clipped to global norm `max_norm` (None or 0: no clipping).

    `known_sq` maps `id(param)` to the squared norm of that parameter's gradient where the caller has it. Returns the
    global norm before clipping (None when not clipping).
    """
    if not max_norm:
        opt.step()
        return None
    known = known_sq or {}
    grads = [p.grad for p in params if p.grad is not None]
    total_sq = sum(known.get(id(p), 0.0) for p in params if p.grad is not None)
    rest = [p.grad for p in params if p.grad is not None and id(p) not in known]
    if rest:
        norms = torch._foreach_norm(rest)
        total_sq += float(torch.stack([n.double() for n in norms]).square().sum())
    total = math.sqrt(total_sq) if total_sq >= 0 else float("nan")
    factor = max_norm / (total + 1e-6)
    if not factor < 1.0:  # within the norm (or NaN, which scaling cannot mend): the step reads them as they are
        opt.step()
        return total
    if factor > 0.0 and getattr(opt, "_step_supports_amp_scaling", False) and not hasattr(opt, "grad_scale"):
        first = grads[0]
        opt.grad_scale = torch.tensor(1.0 / factor, dtype=torch.float32, device=first.device)  # type: ignore[attr-defined]
        try:
            opt.step()
        finally:
            del opt.grad_scale  # type: ignore[attr-defined]
        return total
    torch._foreach_mul_(grads, factor)
    opt.step()
    return total
