"""Superposition science: toy models of superposition (Elhage et al. 2022) and a ground-truth recovery benchmark.

- `toy`: the ReLU-output toy model `ReLU(WᵀW x + b)`, its batched trainer and the geometry analyses
  (feature norms, superposition, feature dimensionality, phases);
- `experiments`: the phase diagram, feature dimensionality (digons, triangles, pentagons) and the transition
  as sparsity grows;
- `data`: the ground-truth generator (superposition, power-law frequencies, correlations, hierarchies,
  magnitudes, offsets, noise, toy-model activations);
- `recovery`: scoring any dictionary against the truth (MMCS, recovery per frequency decile, absorption,
  splitting, FVU, dead latents); `benchmark`: train lmscope dictionaries on the truth and score them;
- `plots`: the figures, written as offline HTML + JSON (+ PNG with kaleido).
"""

from lmscope.synthetic.benchmark import RecoveryBenchConfig, RecoveryResult, dictionary_configs, run_recovery
from lmscope.synthetic.data import GroundTruth, GroundTruthConfig, Samples, generate
from lmscope.synthetic.errors import GroundTruthError, SyntheticError, ToyConfigError
from lmscope.synthetic.experiments import (
    DimsConfig,
    PhaseConfig,
    TransitionConfig,
    dimensionality,
    phase_diagram,
    transition,
)
from lmscope.synthetic.recovery import RecoveryReport, ScoreSettings, score, score_dictionary, score_latents
from lmscope.synthetic.toy import ToyConfig, ToyModel, ToySetting, train_toy

__all__ = [
    "DimsConfig",
    "GroundTruth",
    "GroundTruthConfig",
    "GroundTruthError",
    "PhaseConfig",
    "RecoveryBenchConfig",
    "RecoveryReport",
    "RecoveryResult",
    "Samples",
    "ScoreSettings",
    "SyntheticError",
    "ToyConfig",
    "ToyConfigError",
    "ToyModel",
    "ToySetting",
    "TransitionConfig",
    "dictionary_configs",
    "dimensionality",
    "generate",
    "phase_diagram",
    "run_recovery",
    "score",
    "score_dictionary",
    "score_latents",
    "train_toy",
    "transition",
]
