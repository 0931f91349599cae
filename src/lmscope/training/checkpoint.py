"""Training checkpoints: one safetensors file per trainer (tensors + JSON metadata), written atomically.

The file holds every run's weights, Adam moments and dead-latent counters, plus (as JSON in the safetensors
metadata) the step, tokens seen, normalisation scales and configs. A kill at any moment leaves either the
previous complete checkpoint or the new complete one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor

from lmscope.dictionaries.formats import FormatError, _save_tensors

CHECKPOINT = "checkpoint.safetensors"
_META_KEY = "lmscope_checkpoint"


def save_checkpoint(path: Path, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    _save_tensors(path, tensors, {_META_KEY: json.dumps(meta)})


def load_checkpoint(path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    if not path.is_file():
        raise FormatError(f"no checkpoint at {path}")
    with safe_open(str(path), framework="pt") as f:
        raw = (f.metadata() or {}).get(_META_KEY)
        if raw is None:
            raise FormatError(f"{path} is not an lmscope training checkpoint")
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    return tensors, json.loads(raw)


def optimizer_state(opt: torch.optim.Optimizer, prefix: str) -> tuple[dict[str, Tensor], list[dict[str, Any]]]:
    """Adam's per-parameter tensors (flattened under `prefix`) and its JSON-able param groups."""
    sd = opt.state_dict()
    tensors: dict[str, Tensor] = {}
    for pid, st in sd["state"].items():
        for key, value in st.items():
            tensors[f"{prefix}.{pid}.{key}"] = value if isinstance(value, Tensor) else torch.tensor(value)
    return tensors, sd["param_groups"]


def load_optimizer_state(
    opt: torch.optim.Optimizer, tensors: dict[str, Tensor], prefix: str, groups: list[dict[str, Any]]
) -> None:
    state: dict[int, dict[str, Tensor]] = {}
    for name, value in tensors.items():
        if not name.startswith(prefix + "."):
            continue
        pid, key = name[len(prefix) + 1 :].split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    opt.load_state_dict({"state": state, "param_groups": groups})
