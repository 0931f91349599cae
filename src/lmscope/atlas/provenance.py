"""Where an atlas came from: fingerprints of the model and dictionary, and the evaluation saved with the dictionary."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

from lmscope.dictionaries.formats import dictionary_hash as dictionary_hash  # re-exported: atlas provenance
from lmscope.model.adapter import Model


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
