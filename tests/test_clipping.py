"""training/clipping.py: the clipped optimiser step equals clip_grad_norm_ followed by the step."""

from __future__ import annotations

import math

import pytest
import torch

from lmscope.training.clipping import clipped_step


def _params(seed: int, grad_scale: float) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    ps = [torch.nn.Parameter(torch.randn(*shape, generator=g)) for shape in ((40, 30), (30,), (30, 40), (1,))]
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g) * grad_scale
    ps[3].grad = None  # a parameter without a gradient is left out, as clip_grad_norm_ leaves it
    return ps


def _copy(ps: list[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    out = []
    for p in ps:
        q = torch.nn.Parameter(p.detach().clone())
        q.grad = None if p.grad is None else p.grad.clone()
        out.append(q)
    return out


OPTIMISERS = {
    "fused adam": lambda ps: torch.optim.Adam(ps, lr=1e-2, fused=True),
    "foreach adam": lambda ps: torch.optim.Adam(ps, lr=1e-2, foreach=True),
    "sgd": lambda ps: torch.optim.SGD(ps, lr=1e-1),
}


@pytest.mark.parametrize("name", list(OPTIMISERS))
@pytest.mark.parametrize("grad_scale", [0.01, 3.0], ids=["within the norm", "clipped"])
def test_the_step_equals_clip_grad_norm_then_step(name: str, grad_scale: float) -> None:
    ours = _params(0, grad_scale)
    ref = _copy(ours)
    opt_ours, opt_ref = OPTIMISERS[name](ours), OPTIMISERS[name](ref)
    for step in range(3):
        if step:  # new gradients each step
            g = torch.Generator().manual_seed(10 + step)
            for a, b in zip(ours[:3], ref[:3], strict=True):
                a.grad = torch.randn(a.shape, generator=g) * grad_scale
                b.grad = a.grad.clone()
        expected = float(torch.nn.utils.clip_grad_norm_(ref, 1.0))
        opt_ref.step()
        total = clipped_step(opt_ours, ours, 1.0)
        assert total is not None and math.isclose(total, expected, rel_tol=1e-5)
        assert not hasattr(opt_ours, "grad_scale")  # the scale was for one step only
        for a, b in zip(ours, ref, strict=True):
            torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-6, atol=1e-6)
    if grad_scale > 1:
        assert expected > 1.0  # the case did clip


def test_a_known_squared_norm_replaces_that_gradients_own() -> None:
    ours = _params(1, 3.0)
    ref = _copy(ours)
    opt_ours = torch.optim.Adam(ours, lr=1e-2, fused=True)
    opt_ref = torch.optim.Adam(ref, lr=1e-2, fused=True)
    torch.nn.utils.clip_grad_norm_(ref, 1.0)
    opt_ref.step()
    known = {id(ours[0]): float(ours[0].grad.double().square().sum())}
    ours[0].grad.mul_(1.0)  # unchanged: the known figure is what it would have summed
    total = clipped_step(opt_ours, ours, 1.0, known)
    assert total is not None
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-6, atol=1e-6)
    # a wrong known figure is used as given: it is the caller's contract, so the result differs
    wrong = _params(1, 3.0)
    opt_wrong = torch.optim.Adam(wrong, lr=1e-2, fused=True)
    assert clipped_step(opt_wrong, wrong, 1.0, {id(wrong[0]): 0.0}) < total


def test_no_clipping_is_a_plain_step_and_nan_is_not_hidden() -> None:
    ps = _params(2, 3.0)
    ref = _copy(ps)
    opt, opt_ref = torch.optim.Adam(ps, lr=1e-2, fused=True), torch.optim.Adam(ref, lr=1e-2, fused=True)
    assert clipped_step(opt, ps, None) is None
    opt_ref.step()
    for a, b in zip(ps, ref, strict=True):
        assert torch.equal(a.detach(), b.detach())
    bad = _params(3, 1.0)
    bad[0].grad[0, 0] = float("nan")
    opt_bad = torch.optim.Adam(bad, lr=1e-2, fused=True)
    assert math.isnan(clipped_step(opt_bad, bad, 1.0))
    assert bool(bad[0].detach().isnan().any())  # as clip_grad_norm_ then step would leave it
