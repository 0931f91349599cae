"""The recovery benchmark as a library function: train dictionaries on ground-truth activations, score each.

    from lmscope.synthetic.benchmark import RecoveryBenchConfig, run_recovery
    result = run_recovery(RecoveryBenchConfig(data=GroundTruthConfig(d=64, ratio=4, hierarchies=8)))
    for name, report in result.reports.items():
        print(name, report.line())

Every run trains on the same samples in the same order (one `Trainer`, one pass of the source), so architectures
compare at equal samples. Pass your own `runs` (RunSpecs or DictConfigs) to score your own training settings;
`dictionary_configs` gives one per registered architecture. To score a dictionary trained elsewhere (another
library), call `lmscope.synthetic.recovery.score` with its decoder directions and encode function.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from lmscope.core.progress import ProgressCallback
from lmscope.dictionaries.base import DictConfig, Dictionary, architecture, architectures
from lmscope.synthetic.data import GroundTruth, GroundTruthConfig, generate
from lmscope.synthetic.errors import GroundTruthError
from lmscope.synthetic.recovery import RecoveryReport, ScoreSettings, score_dictionary
from lmscope.training.trainer import RunSpec, TensorSource, TrainConfig, Trainer


@dataclass
class RecoveryBenchConfig:
    data: GroundTruthConfig = field(default_factory=GroundTruthConfig)
    train_samples: int = 65536  # every dictionary trains on the same samples
    eval_samples: int = 8192  # fresh samples the dictionaries are scored on
    batch_size: int = 1024
    epochs: int = 1
    expansion: float = 1.0  # d_sae = expansion × the number of true features
    lr: float | None = 4e-3  # None: each architecture's default (tuned for LM activations, slow here)
    warmup_steps: int = 20
    seed: int = 0  # initialisation; the data use data.seed (truth) and data.seed + 1 / + 2 (train / eval samples)
    dead_window_frac: float = 0.25  # a latent is dead (AuxK revives it) after this fraction of training silent
    # any other TrainConfig field, e.g. {"grad_clip": None, "b_dec_init": "mean", "decay_frac": 1.0} (ablations)
    train_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("train_samples", "eval_samples", "batch_size", "epochs"):
            if getattr(self, name) < 1:
                raise GroundTruthError(f"recovery benchmark: {name}={getattr(self, name)}; it must be positive")
        if self.train_samples < self.batch_size:
            raise GroundTruthError(
                f"recovery benchmark: train_samples={self.train_samples} is less than one batch of "
                f"{self.batch_size}; raise train_samples or lower batch_size"
            )
        if not self.expansion > 0:
            raise GroundTruthError(f"recovery benchmark: expansion={self.expansion}; it must be positive")
        if not 0 < self.dead_window_frac <= 1:
            raise GroundTruthError(
                f"recovery benchmark: dead_window_frac={self.dead_window_frac} is out of range; it must be in (0, 1]"
            )
        fields = {f.name for f in dataclasses.fields(TrainConfig)}
        bad = sorted(set(self.train_options) - (fields - {"total_tokens", "seed"}))
        if bad:
            raise GroundTruthError(
                f"recovery benchmark: train_options {bad} are not TrainConfig fields the benchmark lets you set; use "
                "warmup_steps, decay_frac, min_lr_frac, betas, grad_clip, b_dec_init, normalize, dead_window_tokens"
            )

    def d_sae(self) -> int:
        return max(1, round(self.expansion * self.data.n_features))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def dictionary_configs(
    cfg: RecoveryBenchConfig,
    archs: Sequence[str] | None = None,
    k: int | None = None,
    l1_coeff: float = 2.0,
    l0_coeff: float = 3.0,
    target_l0: float | None = None,
) -> list[DictConfig]:
    """One DictConfig per architecture (default: every registered one) at the benchmark's width.

    Sparsity settings that fit the generator: k = the truth's mean L0 (rounded, at least 1) for k-sparse
    architectures, `l1_coeff` and `l0_coeff` for the penalised ones (inputs are normalised to norm sqrt(d)), and a
    JumpReLU bandwidth and initial threshold of 0.2. An architecture reads only its own fields. With `target_l0`,
    the architectures whose sparsity is a coefficient (relu, jumprelu) aim at that L0 instead, their coefficient the
    controller's starting scale.
    """
    names = list(archs) if archs else architectures()
    for a in names:
        architecture(a)  # raises with the list of known architectures
    k = k if k is not None else max(1, round(cfg.data.active))
    width = cfg.d_sae()
    return [
        DictConfig(
            arch=a,
            d_in=cfg.data.d,
            d_sae=width,
            k=min(k, width),
            l1_coeff=l1_coeff,
            l0_coeff=l0_coeff,
            jumprelu_bandwidth=0.2,
            jumprelu_init_threshold=0.2,
            target_l0=target_l0 if architecture(a).controlled_coeff is not None else None,
        )
        for a in names
    ]


@dataclass
class RecoveryResult:
    config: RecoveryBenchConfig
    truth: GroundTruth
    reports: dict[str, RecoveryReport]  # run name -> its report
    archs: dict[str, str]  # run name -> architecture
    train_seconds: float  # all runs together (they train interleaved, batch by batch)
    dictionaries: dict[str, Dictionary] = field(default_factory=dict)  # run name -> the trained dictionary

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "truth": self.truth.describe(),
            "train_seconds": self.train_seconds,
            "runs": {name: {"arch": self.archs[name], **report.to_dict()} for name, report in self.reports.items()},
        }


def run_recovery(
    cfg: RecoveryBenchConfig,
    runs: Sequence[RunSpec | DictConfig] | None = None,
    progress: ProgressCallback | None = None,
    device: str = "cpu",
    settings: ScoreSettings | None = None,
    truth: GroundTruth | None = None,
) -> RecoveryResult:
    """Generate the truth (or take `truth`), train every run on the same samples, score each on fresh samples."""
    truth = truth if truth is not None else generate(cfg.data, progress, device)
    specs = [
        r if isinstance(r, RunSpec) else RunSpec(r, lr=cfg.lr)
        for r in (runs if runs is not None else dictionary_configs(cfg))
    ]
    # every run starts from the same random draws (cfg.seed), so a run's result does not depend on which others
    # train beside it (the trainer's default seeds run i with seed + i) and architectures compare at equal init
    specs = [s if s.init_seed is not None else dataclasses.replace(s, init_seed=cfg.seed) for s in specs]
    for s in specs:
        if s.dict_cfg.d_in != truth.d:
            raise GroundTruthError(
                f"recovery benchmark: run {s.resolved_name()} reads d_in={s.dict_cfg.d_in} but the truth has "
                f"d={truth.d}; build its DictConfig with d_in={truth.d}"
            )
    x = truth.activations(cfg.train_samples, seed=cfg.data.seed + 1)
    window = max(cfg.batch_size, round(cfg.train_samples * cfg.epochs * cfg.dead_window_frac))
    options = {"warmup_steps": cfg.warmup_steps, "dead_window_tokens": window, "log_every": 10, **cfg.train_options}
    tc = TrainConfig(total_tokens=cfg.train_samples * cfg.epochs, seed=cfg.seed, **options)
    t0 = time.perf_counter()
    dictionaries = Trainer(specs, tc, device=device).fit(
        TensorSource(x, batch_size=cfg.batch_size, epochs=cfg.epochs), progress=progress
    )
    seconds = time.perf_counter() - t0
    eval_samples = truth.sample(cfg.eval_samples, seed=cfg.data.seed + 2)
    reports = {name: score_dictionary(truth, d, eval_samples, settings=settings) for name, d in dictionaries.items()}
    archs = {s.resolved_name(): s.dict_cfg.arch for s in specs}
    return RecoveryResult(cfg, truth, reports, archs, seconds, dict(dictionaries))
