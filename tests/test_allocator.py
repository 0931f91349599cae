"""The trainer's glibc allocator settings: set once, only on glibc, never over the user's own choice."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBE = "from lmscope.core.allocator import keep_freed_blocks as k; print(k(), k())"


def _run(env: dict[str, str]) -> str:
    full = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "LMSCOPE_MALLOC"))}
    out = subprocess.run([sys.executable, "-c", PROBE], env={**full, **env}, capture_output=True, text=True, check=True)
    return out.stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt is Linux-only")
def test_set_once_on_glibc_and_idempotent() -> None:
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").gnu_get_libc_version  # noqa: B018
    except (OSError, AttributeError):
        pytest.skip("not glibc")
    assert _run({}) == "True True"


def test_opt_out_leaves_the_allocator_alone() -> None:
    assert _run({"LMSCOPE_MALLOC": "default"}) == "False False"


def test_the_trainer_sets_it_before_training_on_a_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from lmscope.dictionaries import DictConfig
    from lmscope.training import TensorSource, TrainConfig, Trainer
    from lmscope.training import trainer as trainer_module

    calls: list[bool] = []
    monkeypatch.setattr(trainer_module, "keep_freed_blocks", lambda: calls.append(True) or True)
    x = torch.randn(256, 8)
    Trainer([DictConfig(arch="topk", d_in=8, d_sae=16, k=2)], TrainConfig(total_tokens=256, warmup_steps=1)).fit(
        TensorSource(x, batch_size=128), progress=False
    )
    assert calls == [True]
