"""Runs that say when they are sick (training.health) and a target L0 instead of a raw coefficient
(training.sparsity_control): checks over synthetic metric streams, the controller alone, and both end to end."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import re

import pytest
import torch

from lmscope.core.progress import ProgressEvent
from lmscope.dictionaries import DictConfig
from lmscope.synthetic.data import GroundTruthConfig, generate
from lmscope.training import RunSpec, TensorSource, TrainConfig, Trainer
from lmscope.training.health import HealthMonitor, check_eval, check_history
from lmscope.training.metrics import read_log
from lmscope.training.sparsity_control import ControlSettings, SparsityController, controller_for

RELU = DictConfig(arch="relu", d_in=64, d_sae=256)
TOPK = DictConfig(arch="topk", d_in=64, d_sae=256, k=8)


def _rec(step: int, **values: float) -> dict[str, float]:
    base = {"step": step, "loss": 1.0, "mse": 0.5, "fvu": 0.2, "l0": 8.0, "dead_frac": 0.0}
    return {**base, **values}


def _codes(records: list[dict[str, float]], cfg: DictConfig = TOPK, progress: float = 0.5) -> list[str]:
    return [w.code for w in check_history(records, cfg, progress)]


def test_a_healthy_stream_raises_nothing() -> None:
    records = [_rec(i, mse=0.5 / (1 + i), fvu=0.5 / (1 + i)) for i in range(20)]
    assert _codes(records) == []
    assert _codes([]) == []


def test_each_sickness_is_flagged_by_its_own_code() -> None:
    assert _codes([_rec(1), _rec(2, loss=math.nan)]) == ["nonfinite"]
    assert _codes([_rec(1), _rec(2, loss=math.inf, mse=math.inf)]) == ["nonfinite"]
    assert _codes([_rec(1, mse=0.1), _rec(2, mse=0.5), _rec(3, mse=1.2)]) == ["diverging"]  # 12x its low
    assert _codes([_rec(1, mse=0.1), _rec(2, mse=0.5), _rec(3, mse=0.9)]) == []  # 9x: not yet
    assert _codes([_rec(1, fvu=1.3)]) == ["fvu"]
    assert _codes([_rec(1, l0=17.0)]) == ["l0"]  # k = 8 is TopK's target: 2.1x above
    assert _codes([_rec(1, l0=3.9)]) == ["l0"]  # 2.05x below
    assert _codes([_rec(1, l0=15.0)]) == []
    climb = [_rec(i, dead_frac=d) for i, d in enumerate([0.01, 0.02, 0.05, 0.08, 0.12])]
    assert _codes(climb) == ["dead_rising"]
    assert _codes(climb[-2:]) == []  # 8% to 12%: not a climb of 10 points
    assert _codes([_rec(1, dead_frac=0.6)]) == ["dead_high"]
    old_climb = [_rec(i, dead_frac=0.01) for i in range(3)] + [_rec(3 + i, dead_frac=0.2) for i in range(12)]
    assert _codes(old_climb) == []  # out of the window of 10 log lines: no longer "climbing"


def test_fvu_and_l0_wait_for_the_grace_period_and_l0_needs_a_target() -> None:
    sick = [_rec(1, fvu=1.5, l0=40.0)]
    assert _codes(sick, progress=0.05) == []
    assert _codes(sick, progress=0.1) == ["fvu", "l0"]
    relu = [_rec(1, l0=40.0)]  # no target: judged against the width (more than 32 of 64 dims is not sparse)
    assert _codes(relu, RELU) == ["l0"] and _codes([_rec(1, l0=20.0)], RELU) == []
    assert _codes([_rec(1, l0=0.5)], RELU) == ["l0"]  # under one latent per token
    target = DictConfig(arch="relu", d_in=64, d_sae=256, target_l0=10)
    assert _codes([_rec(1, l0=25.0)], target) == ["l0"] and _codes([_rec(1, l0=12.0)], target) == []
    assert _codes([_rec(1, l0=25.0)], target, progress=0.4) == []  # its controller is still coming down
    (warning,) = check_history([_rec(1, l0=25.0)], target, 0.5)
    assert "L0 25.0 is 2.5x above its target 10" in warning.message


def test_the_monitor_reports_a_warning_once_and_again_after_it_cleared() -> None:
    m = HealthMonitor(TOPK)
    assert m.observe(_rec(1), 0.5) == [] and m.line() == "ok"
    assert [w.code for w in m.observe(_rec(2, fvu=1.2), 0.5)] == ["fvu"]
    assert m.observe(_rec(3, fvu=1.1), 0.5) == [] and m.line().startswith("FVU 1.100 exceeds 1")
    assert m.observe(_rec(4), 0.5) == [] and m.line() == "ok"
    assert [w.code for w in m.observe(_rec(5, fvu=1.4), 0.5)] == ["fvu"]
    assert [(r["step"], r["code"]) for r in m.summary()["raised"]] == [(2, "fvu"), (5, "fvu")]


def test_a_resumed_monitor_carries_on_as_if_it_had_never_stopped() -> None:
    deads = [0.0, 0.0, 0.05, 0.12, 0.2, 0.2, 0.2]
    fvus = [0.5, 1.2, 1.1, 0.4, 0.3, 0.3, 1.5]
    stream = [_rec(i, dead_frac=d, fvu=f) for i, (d, f) in enumerate(zip(deads, fvus, strict=True))]
    straight, before = HealthMonitor(TOPK), HealthMonitor(TOPK)
    lines = [(straight.log(dict(r), 0.5), straight.line())[1] for r in stream]
    written: list[dict[str, object]] = []
    for r in stream[:4]:
        rec = dict(r)
        before.log(rec, 0.5)
        written.append(json.loads(json.dumps(rec)))  # what metrics.jsonl holds
    resumed = HealthMonitor(TOPK)
    resumed.restore(written, total_steps=6)  # the last record is step 3 of 6: progress 0.5, as logged
    assert resumed.line() == lines[3]
    again = [(resumed.log(dict(r), 0.5), resumed.line())[1] for r in stream[4:]]
    assert again == lines[4:] and resumed.summary() == straight.summary()
    assert [r["code"] for r in straight.summary()["raised"]] == ["fvu", "dead_rising", "fvu"]


def test_eval_warnings_for_a_finished_dictionary() -> None:
    assert check_eval({"fvu": 0.2, "l0": 8.0, "dead_frac": 0.01}, TOPK) == []
    found = check_eval({"fvu": 7.97, "l0": 488.0, "dead_frac": 0.6}, DictConfig(arch="jumprelu", d_in=576, d_sae=4608))
    assert [w.code for w in found] == ["fvu", "l0", "dead_high"]
    assert "hardly sparse; raise l0_coeff or set a target L0" in found[1].message
    bt = check_eval({"fvu": 0.2, "l0": 30.0, "dead_frac": 0.0}, DictConfig(arch="batchtopk", d_in=64, d_sae=256, k=8))
    assert [w.message for w in bt] == ["L0 30.0 is 3.8x above its target 8; the inference threshold does not give k"]


def _plant(coeffs: list[float], lag: int = 5) -> float:
    """A toy dictionary: its L0 follows 40 / coefficient, the coefficient of `lag` steps ago."""
    c = coeffs[max(0, len(coeffs) - 1 - lag)]
    return 40.0 / c


def test_the_controller_reaches_its_target_and_resumes_exactly_from_json() -> None:
    ctl = SparsityController(target_l0=8.0, initial_coeff=20.0, total_steps=400, hold_steps=20)
    coeffs = [ctl.coeff]
    assert ctl.coeff == pytest.approx(1.0)  # starts at 1/20 of the given coefficient: L0 40, above the target
    for _ in range(200):
        coeffs.append(ctl.update(_plant(coeffs)))
    assert coeffs[20] == coeffs[0]  # held still over the warmup
    saved = json.loads(json.dumps(ctl.state()))
    twin = SparsityController(target_l0=8.0, initial_coeff=20.0, total_steps=400)
    twin.load(saved)
    twin_coeffs = list(coeffs)
    for _ in range(200):
        coeffs.append(ctl.update(_plant(coeffs)))
        twin_coeffs.append(twin.update(_plant(twin_coeffs)))
    assert coeffs == twin_coeffs  # bit for bit
    assert _plant(coeffs) == pytest.approx(8.0, rel=0.05)
    assert max(abs(math.log(b / a)) for a, b in itertools.pairwise(coeffs)) <= 0.05 + 0.3 * 0.4
    with pytest.raises(Exception, match="aims at L0 8, this run at 9"):
        SparsityController(9.0, 1.0, 10).load(saved)
    assert controller_for(TOPK, 100) is None and controller_for(RELU, 100) is None
    jr = DictConfig(arch="jumprelu", d_in=8, d_sae=32, target_l0=4, l0_coeff=0.2, token_topk_frac=0.0)
    ctl2 = controller_for(jr, 100)
    assert ctl2 is not None and ctl2.hold == 5 and ctl2.coeff == pytest.approx(0.2 * ControlSettings().start)
    # with a TopK phase (the default) the penalty starts at its end: held through it and the ramp after, and the
    # gain paced to the 125 steps left of 1,000 (without: 1,000)
    ctl3 = controller_for(dataclasses.replace(jr, token_topk_frac=0.875), 1000)
    assert ctl3 is not None and ctl3.hold == 925 and ctl3.gain == ControlSettings().max_gain  # 10 / 125, capped
    assert controller_for(jr, 1000).gain == pytest.approx(10 / 1000)


def _recovery_data(samples: int) -> tuple[torch.Tensor, int]:
    truth = generate(GroundTruthConfig(d=64, ratio=4, active=4, hierarchies=8, children=2, offset=2.0, noise=0.05))
    return truth.activations(samples, seed=1), truth.d


def test_relu_on_recovery_data_warns_with_a_too_small_coefficient_and_reaches_a_target_l0(tmp_path) -> None:
    torch.set_num_threads(1)
    x, d = _recovery_data(1 << 18)
    runs = [
        # far too weak a penalty
        RunSpec(DictConfig(arch="relu", d_in=d, d_sae=256, l1_coeff=0.01, token_topk_frac=0.0), lr=4e-3),
        # the controller over the whole run (with the default TopK phase it acts on the last eighth only:
        # tests/test_topk_phase.py checks that case)
        RunSpec(DictConfig(arch="relu", d_in=d, d_sae=256, target_l0=12, l1_coeff=2.0, token_topk_frac=0.0), lr=4e-3),
    ]
    events: list[ProgressEvent] = []
    tc = TrainConfig(total_tokens=x.shape[0], warmup_steps=20, log_every=16, dead_window_tokens=1 << 16)
    out = Trainer(runs, tc, tmp_path).fit(TensorSource(x, batch_size=1024), progress=events.append)
    weak, aimed = out.values()
    notes = [n for e in events for n in e.notes]
    assert any(
        re.fullmatch(
            r"relu-m256-l1_0\.01: warning: L0 \d+\.\d is more than 50% of the input width 64: "
            r"hardly sparse; raise l1_coeff or set a target L0 \(--target-l0\)",
            n,
        )
        for n in notes
    )
    assert not [n for n in notes if n.startswith("relu-m256-l0target_12")]
    assert weak.metadata["training"]["health"]["line"].startswith("L0 ")  # still sick at the end
    assert aimed.metadata["training"]["health"]["line"] == "ok"
    with torch.no_grad():
        l0 = float((aimed.encode(x[:8192]) > 0).float().sum(-1).mean())
    assert l0 == pytest.approx(12, rel=0.2)
    assert aimed.cfg.l1_coeff == aimed.metadata["training"]["sparsity_control"]["coeff"] != 2.0
    log = [r for r in read_log(tmp_path / "metrics.jsonl") if r["run"] == "relu-m256-l0target_12"]
    assert log[-1]["health"] == "ok" and "coeff" in log[-1]
    assert any(r["health"].startswith("L0 ") for r in read_log(tmp_path / "metrics.jsonl") if r["run"] != log[0]["run"])


def test_the_recovery_benchmark_gives_the_target_to_the_architectures_that_take_one() -> None:
    from lmscope.synthetic.benchmark import RecoveryBenchConfig, dictionary_configs

    cfgs = dictionary_configs(RecoveryBenchConfig(), target_l0=4)
    assert {c.arch: c.target_l0 for c in cfgs} == {
        "topk": None, "batchtopk": None, "relu": 4, "jumprelu": 4, "matryoshka": None
    }  # fmt: skip
