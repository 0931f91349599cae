"""The trainer's bookkeeping: schedule, dead latents, sweeps, metrics log, and resume after a kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from safetensors.torch import load_file

from lmscope.dictionaries import DictConfig, DictionaryError, build
from lmscope.dictionaries.formats import load_dictionary
from lmscope.training import RunSpec, Schedule, TensorSource, TrainConfig, Trainer
from lmscope.training.dead import DeadTracker
from lmscope.training.init import geometric_median
from lmscope.training.metrics import read_log


def test_schedule_warmup_plateau_decay() -> None:
    s = Schedule(total_steps=100, warmup_steps=10, decay_frac=0.2)
    assert s.factor(0) == pytest.approx(0.1) and s.factor(9) == pytest.approx(1.0)
    assert s.factor(50) == 1.0 and s.factor(79) == 1.0
    assert s.factor(80) == pytest.approx(0.95) and s.factor(99) == pytest.approx(0.0)
    assert all(s.factor(i) >= s.factor(i + 1) for i in range(10, 99))
    assert Schedule(100, 0, 0.0).factor(99) == 1.0


def test_dead_tracker_window() -> None:
    t = DeadTracker(4, window_tokens=100)
    t.update(torch.tensor([1.0, 0, 0, 2]), 60)
    assert t.dead_mask().tolist() == [False, False, False, False]
    t.update(torch.tensor([0.0, 3, 0, 0]), 60)
    assert t.dead_mask().tolist() == [False, False, True, False]  # latent 2: silent for 120 tokens > window
    assert t.dead_fraction() == 0.25
    assert t.densities().tolist() == pytest.approx([1 / 120, 3 / 120, 0, 2 / 120])
    state = t.state()
    fresh = DeadTracker(4, 100)
    fresh.load(state)
    assert torch.equal(fresh.dead_mask(), t.dead_mask())


def test_geometric_median_resists_outliers() -> None:
    pts = torch.cat([torch.randn(200, 3) * 0.1, torch.full((20, 3), 100.0)])
    assert geometric_median(pts).norm() < 1.0 < pts.mean(0).norm()


def test_sweep_logs_metrics_and_saves_every_run(tmp_path: Path) -> None:
    x = torch.randn(4096, 16) * 5 + 2
    runs = [RunSpec(DictConfig(arch="topk", d_in=16, d_sae=64, k=k)) for k in (2, 8)]
    runs.append(RunSpec(DictConfig(arch="relu", d_in=16, d_sae=32)))
    tc = TrainConfig(total_tokens=8 * 256, warmup_steps=2, log_every=4, progress_bar=False, dead_window_tokens=512)
    out = Trainer(runs, tc, tmp_path).fit(TensorSource(x, batch_size=256))
    assert set(out) == {"topk-m64-k2", "topk-m64-k8", "relu-m32-l1_5"}
    log = read_log(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in log if r["run"] == "topk-m64-k2"] == [4, 8]
    assert {"fvu", "l0", "dead_frac", "lr", "mse", "aux", "tok_s"} <= set(log[0])
    assert next(r["l0"] for r in log if r["run"] == "topk-m64-k8") == pytest.approx(8.0)
    for name, d in out.items():
        saved = load_dictionary(tmp_path / name)
        assert saved.metadata["normalization"]["folded"] and saved.metadata["training"]["tokens"] == 2048
        assert torch.equal(saved.W_enc, d.W_enc)


def _fvu(d: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        recon = d(x)[0]
    return float((y - recon).pow(2).sum() / (y - y.mean(0)).pow(2).sum())


def test_transcoder_and_multi_hook_batches(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 16, generator=g)
    # the target has the input's width, so an SAE fed the wrong hook would train without error: only its
    # weights can tell
    y = torch.relu(x @ torch.randn(16, 16, generator=g))
    cfg = DictConfig(arch="topk", d_in=16, d_sae=64, d_out=16, k=4, hook="blocks.0.mlp_in", hook_out="blocks.0.mlp_out")
    tc = TrainConfig(total_tokens=1024, warmup_steps=1, progress_bar=False)
    d = next(iter(Trainer([cfg], tc).fit(TensorSource(x, y, batch_size=256)).values()))
    assert d(x[:5])[0].shape == (5, 16)

    class Hooks:
        mean_norm: ClassVar[dict[str, float]] = {
            "blocks.0.mlp_in": float(x.norm(dim=1).mean()),
            "blocks.0.mlp_out": float(y.norm(dim=1).mean()),
        }

        def __init__(self, epochs: int = 1) -> None:
            self.epochs = epochs

        def __iter__(self):
            for _ in range(self.epochs):
                for s in range(0, 2048, 256):
                    yield {"blocks.0.mlp_in": x[s : s + 256], "blocks.0.mlp_out": y[s : s + 256]}

    # a transcoder and an SAE in one pass: each is exactly what it would be trained alone on its own hooks'
    # tensors (run i is built with seed + i, hence seed=1 for the SAE alone), and each learned
    sae = DictConfig(arch="topk", d_in=16, d_sae=32, k=4, hook="blocks.0.mlp_in")
    multi = TrainConfig(total_tokens=24 * 256, warmup_steps=1)
    out = Trainer([RunSpec(cfg, lr=0.03), RunSpec(sae, lr=0.03)], multi).fit(Hooks(epochs=3))
    assert list(out) == ["blocks.0.mlp_in-topk-m64-k4", "blocks.0.mlp_in-topk-m32-k4"]
    tcoder, ae = out.values()
    assert tcoder.cfg.is_transcoder and tcoder.cfg.d_out == 16
    assert (tcoder.cfg.hook, tcoder.cfg.hook_out) == ("blocks.0.mlp_in", "blocks.0.mlp_out")
    assert not ae.cfg.is_transcoder and ae.cfg.hook == "blocks.0.mlp_in" and ae.cfg.d_sae == 32
    (tcoder_alone,) = Trainer([RunSpec(cfg, lr=0.03)], multi).fit(TensorSource(x, y, 256, epochs=3)).values()
    (ae_alone,) = Trainer([RunSpec(sae, lr=0.03)], replace(multi, seed=1)).fit(TensorSource(x, None, 256, 3)).values()
    for together, alone in ((tcoder, tcoder_alone), (ae, ae_alone)):
        a, b = together.state_dict(), alone.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # both learned: the transcoder from 1.7 (untrained) to ~0.36, the SAE (k=4 of 16 Gaussian dims) from 0.67 to ~0.38
    assert _fvu(tcoder, x, y) < 0.45 < 1.5 < _fvu(build(cfg, seed=0), x, y)
    assert _fvu(ae, x, x) < 0.45 < 0.6 < _fvu(build(sae, seed=1), x, x)
    with pytest.warns(UserWarning, match="ran out after 2,048 of 4,096 tokens"):
        Trainer([sae], TrainConfig(total_tokens=4096, progress_bar=False)).fit(Hooks())
    with pytest.raises(DictionaryError, match="must report mean_norm_out"):
        Trainer([cfg], tc).fit(TensorSource(x, batch_size=256))
    single = TensorSource(x, batch_size=256)
    single.mean_norm_out = 1.0
    with pytest.raises(DictionaryError, match="is a transcoder but the source yields single tensors"):
        Trainer([cfg], tc).fit(single)


SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    import torch
    from lmscope.dictionaries import DictConfig
    from lmscope.training import RunSpec, TensorSource, TrainConfig, Trainer

    out, kill_at = sys.argv[1], int(sys.argv[2])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8192, 16, generator=g) @ torch.randn(16, 16, generator=g) + 1.0
    runs = [RunSpec(DictConfig(arch=a, d_in=16, d_sae=48, k=4)) for a in ("topk", "batchtopk", "relu", "jumprelu",
                                                                            "matryoshka")]
    runs.append(RunSpec(DictConfig(arch="relu", d_in=16, d_sae=48, target_l0=6)))  # the L0 controller's state too
    tc = TrainConfig(total_tokens=16 * 512, warmup_steps=3, checkpoint_every=5, progress_bar=False,
                     dead_window_tokens=1024, log_every=2)

    def maybe_die(trainer):
        if trainer.step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    Trainer(runs, tc, out).fit(TensorSource(x, batch_size=512), on_step=maybe_die)
    """
)


def _run(script: Path, out: Path, kill_at: int) -> int:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(script), str(out), str(kill_at)], env=env, timeout=300).returncode


def test_killed_and_resumed_run_matches_uninterrupted(tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    assert _run(script, tmp_path / "straight", -1) == 0
    assert _run(script, tmp_path / "killed", 8) == -signal.SIGKILL  # after the step-5 checkpoint, before step 10
    assert not (tmp_path / "killed" / "topk-m48-k4").exists()
    assert _run(script, tmp_path / "killed", -1) == 0  # resumes from step 5
    runs = ("straight", "killed")
    names = ("topk-m48-k4", "batchtopk-m48-k4", "relu-m48-l1_5", "jumprelu-m48-l0_0.001", "matryoshka-m48-k4",
             "relu-m48-l0target_6")
    for name in names:
        a = load_file(str(tmp_path / "straight" / name / "dictionary.safetensors"))
        b = load_file(str(tmp_path / "killed" / name / "dictionary.safetensors"))
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}/{key} differs after resume"
        health = [json.loads((tmp_path / r / name / "config.json").read_text())["training"]["health"] for r in runs]
        assert health[0] == health[1], f"{name}: the health record differs after resume"
    # the controller resumed where it was: the same coefficient at the end, which it had moved from its start
    controlled = "relu-m48-l0target_6"
    configs = [json.loads((tmp_path / r / controlled / "config.json").read_text()) for r in runs]
    assert configs[0]["config"] == configs[1]["config"]
    assert configs[0]["training"]["sparsity_control"] == configs[1]["training"]["sparsity_control"]
    assert configs[0]["config"]["l1_coeff"] != 5.0 * configs[0]["training"]["sparsity_control"]["settings"]["start"]
    log = read_log(tmp_path / "killed" / "metrics.jsonl")
    steps = [r["step"] for r in log if r["run"] == "topk-m48-k4"]
    assert steps == list(range(2, 17, 2))  # the steps logged between checkpoint and kill are not duplicated


def test_wandb_asked_for_but_missing_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lmscope.errors import LmscopeError
    from lmscope.training.metrics import MetricsLog

    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` raise ImportError
    with pytest.raises(LmscopeError, match="pip install wandb"):
        MetricsLog(tmp_path / "m.jsonl", wandb_project="lmscope")
    log = MetricsLog(tmp_path / "m.jsonl")  # not asked for: JSONL only
    log.log({"step": 1, "fvu": 0.5})
    assert read_log(tmp_path / "m.jsonl") == [{"step": 1, "fvu": 0.5}]
