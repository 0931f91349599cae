"""Where an atlas came from: fingerprints of the model and dictionary, and the evaluation saved with the dictionary."""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from lmscope.dictionaries.base import Dictionary
from lmscope.model.adapter import Model


def dictionary_hash(d: Dictionary) -> str:
    """sha256 over the dictionary's tensors (names, dtypes, sizes and bytes, in name order)."""
    h = hashlib.sha256()
    for name, t in sorted(d.state_dict().items()):
        t = t.detach().reshape(-1).contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{t.numel()}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def model_hash(model: Model) -> str:
    """The model's weight fingerprint (as harvests record it), or "" if it cannot be computed."""
    try:
        from lmscope.activations import model_fingerprint

        return model_fingerprint(model)
    except Exception:  # pragma: no cover - the harvest package is optional for the atlas
        return ""


def load_eval_metrics(dict_path: str | None) -> dict[str, Any]:
    """Evaluation results saved next to the dictionary (eval.json / metrics.json), if any."""
    if not dict_path:
        return {}
    out: dict[str, Any] = {}
    for name in ("eval.json", "evaluation.json", "metrics.json"):
        p = Path(dict_path) / name
        if p.is_file():
            with contextlib.suppress(json.JSONDecodeError, OSError):
                out[name] = json.loads(p.read_text())
    return out
