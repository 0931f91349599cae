"""Resumable parts of a long job: each part is computed once and saved as it finishes (`parts/NAME.json`, plus
`parts/NAME.safetensors` for its tensors), so a rerun after a kill skips what is done; a damaged part is
recomputed, never used. Used by the model diff and the audit."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lmscope.core.atomic import atomic_write_json
from lmscope.core.progress import ProgressCallback, ProgressEvent


def saved_part(
    out: Path,
    name: str,
    make: Callable[[], dict[str, Any]],
    progress: ProgressCallback | None = None,
    arrays: Callable[[dict[str, Any]], dict[str, torch.Tensor]] | None = None,
) -> dict[str, Any]:
    """The part saved under `out/parts`, or `make()` it, time it (`seconds`) and save it. `arrays` pulls tensors
    out of the result into NAME.safetensors (written before the JSON, which marks the part complete; keys of the
    result starting with `_` stay out of the JSON); the loaded tensors come back under `_arrays`."""
    from safetensors.torch import load_file, save_file

    p, st = out / "parts" / f"{name}.json", out / "parts" / f"{name}.safetensors"
    if p.is_file():
        try:
            result = dict(json.loads(p.read_text()))
            if arrays is not None:
                result["_arrays"] = load_file(str(st))
            return result
        except (ValueError, OSError, RuntimeError):
            p.unlink(missing_ok=True)
    if progress:
        progress(ProgressEvent(name, 0, 1, "parts"))
    t0 = time.perf_counter()
    result = make()
    result["seconds"] = round(time.perf_counter() - t0, 1)
    p.parent.mkdir(parents=True, exist_ok=True)
    if arrays is not None:
        tensors = {k: v.contiguous() for k, v in arrays(result).items()}
        tmp = st.with_name(st.name + ".tmp")
        save_file(tensors, str(tmp))
        tmp.replace(st)
        result = {k: v for k, v in result.items() if not k.startswith("_")}
        atomic_write_json(p, result)
        result["_arrays"] = tensors
    else:
        atomic_write_json(p, result)
    if progress:
        progress(ProgressEvent(name, 1, 1, "parts", f"{result['seconds']} s", finished=True))
    return result
