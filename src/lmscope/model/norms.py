"""Normalisation layers with their scale frozen: the per-architecture knowledge of how each norm is linear.

A LayerNorm or RMSNorm is `y = A(x) * s(x) * w + b`: `A` centres (LayerNorm) or not (RMSNorm), `s(x)` is one
scalar per token (1 / sqrt(var + eps)), `w` the gain (Gemma stores `w - 1`), `b` a bias (LayerNorm only). With
`s` held at its value at a recorded input `x0`, the norm is the affine map `y0 + A(x - x0) * s(x0) * w`. That is
what attribution graphs need (lmscope.circuits): the map's value at `x0` is the real output, bit for bit, and its
derivative is the frozen-scale Jacobian.

Norm classes register by name (`register_norm`, a class-name suffix plus the rule); a class that matches no rule is
refused with its name, never guessed. `FrozenNorm.check` compares the rule's output with the module's own at the
recorded input, so a rule that does not describe a module is caught before it is used.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from lmscope.errors import HookError


@dataclass(frozen=True)
class NormRule:
    center: bool  # LayerNorm subtracts the mean; RMSNorm does not
    weight_offset: float  # Gemma's RMSNorm multiplies by (1 + weight)
    eps_attrs: tuple[str, ...] = ("eps", "variance_epsilon")


_RULES: list[tuple[Callable[[nn.Module], bool], str, NormRule]] = []


def register_norm(name: str, matches: Callable[[nn.Module], bool], rule: NormRule) -> None:
    """Add a rule for the norm modules `matches` accepts; a name registered twice is refused."""
    if any(n == name for _m, n, _r in _RULES):
        raise HookError(f"a norm rule named {name!r} is already registered")
    _RULES.append((matches, name, rule))


def _named(suffix: str, prefix: str = "") -> Callable[[nn.Module], bool]:
    return lambda m: type(m).__name__.endswith(suffix) and type(m).__name__.startswith(prefix)


register_norm("layernorm", lambda m: isinstance(m, nn.LayerNorm), NormRule(center=True, weight_offset=0.0))
register_norm("gemma-rmsnorm", _named("RMSNorm", "Gemma"), NormRule(center=False, weight_offset=1.0))
register_norm("rmsnorm", _named("RMSNorm"), NormRule(center=False, weight_offset=0.0))


def rule_for(module: nn.Module) -> NormRule:
    for matches, _name, rule in _RULES:
        if matches(module):
            return rule
    raise HookError(
        f"lmscope does not know how to freeze the scale of {type(module).__name__}: register a NormRule for it in "
        "lmscope/model/norms.py (LayerNorm and RMSNorm variants are known)"
    )


class FrozenNorm:
    """A norm module's frozen-scale affine map around one recorded input."""

    def __init__(self, module: nn.Module, x0: torch.Tensor) -> None:
        self.rule = rule_for(module)
        eps = next((getattr(module, a) for a in self.rule.eps_attrs if hasattr(module, a)), None)
        if eps is None:
            raise HookError(f"{type(module).__name__} has no eps attribute ({', '.join(self.rule.eps_attrs)})")
        x = x0.detach().float()
        if self.rule.center:
            x = x - x.mean(-1, keepdim=True)
        self.scale = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + float(eps))  # [..., 1], per token
        weight = getattr(module, "weight", None)
        w = weight.detach().float() + self.rule.weight_offset if weight is not None else None
        bias = getattr(module, "bias", None)
        self.gain = self.scale * w if w is not None else self.scale
        self.bias = bias.detach().float() if isinstance(bias, torch.Tensor) else None
        self.x0 = x0.detach()

    def linear(self, dx: torch.Tensor) -> torch.Tensor:
        """The frozen-scale Jacobian applied to dx: A(dx) * s(x0) * w."""
        if self.rule.center:
            dx = dx - dx.mean(-1, keepdim=True)
        return (dx.float() * self.gain).to(dx.dtype)

    def check(self, y0: torch.Tensor, path: str, rtol: float = 1e-4) -> None:
        """Refuse a rule that does not reproduce the module's output at the recorded input."""
        mine = self.linear(self.x0.float())
        if self.bias is not None:
            mine = mine + self.bias
        err = float((mine - y0.float()).norm() / y0.float().norm().clamp_min(1e-12))
        if not err <= rtol:
            raise HookError(
                f"the frozen-scale rule {self.rule} does not reproduce the norm at {path} (relative error {err:.2e}); "
                "register the right NormRule for its class in lmscope/model/norms.py"
            )
