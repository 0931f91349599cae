"""Make a model organism (`make_organism`) and read one back (`read_ground_truth`).

An organism directory is a loadable model directory (float32 `model.safetensors`, `config.json`, tokenizer) plus:
- `ground_truth.json`: the kind, the recipe with its seed, the base model, exactly what was planted, and the
  behaviour measured on held-out prompts for the base model and the organism. It is written last: a directory
  without it is unfinished (rerun the same command to resume) or not an organism.
- `checkpoints/step-N/`: loadable model directories during training; `training.jsonl`: the loss per step;
- `resume.safetensors`: the training state, removed when the organism is complete.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from lmscope._version import __version__
from lmscope.core.atomic import atomic_write_json
from lmscope.core.progress import ProgressCallback, ProgressEvent
from lmscope.errors import OrganismError
from lmscope.model.adapter import Model
from lmscope.model.loading import save_model_files
from lmscope.organisms.behaviour import measure
from lmscope.organisms.finetune import RESUME, FinetuneConfig, finetune
from lmscope.organisms.recipes import OrganismConfig, build_recipe

GROUND_TRUTH = "ground_truth.json"
FORMAT = "lmscope-organism/1"


def read_ground_truth(directory: str | Path) -> dict[str, Any]:
    """The organism's ground truth; refuses a directory that is not a finished organism, naming the fix."""
    d = Path(directory)
    p = d / GROUND_TRUTH
    if not p.is_file():
        hint = (
            "its training is unfinished: rerun the same `lmscope organism` command to resume"
            if (d / RESUME).is_file()
            else "it is not an lmscope organism (make one with `lmscope organism KIND --base MODEL --out DIR`)"
        )
        raise OrganismError(f"{d} has no {GROUND_TRUTH}: {hint}")
    try:
        gt = json.loads(p.read_text())
    except (OSError, ValueError) as exc:
        raise OrganismError(f"{p} is not valid JSON ({exc}); the organism is damaged, make it again") from None
    if not isinstance(gt, dict) or gt.get("format") != FORMAT or gt.get("kind") is None:
        raise OrganismError(f"{p} is not an lmscope organism ground truth (format {FORMAT!r} expected)")
    return gt


def make_organism(
    base: Model,
    cfg: OrganismConfig,
    out: str | Path,
    base_spec: str | None = None,
    progress: ProgressCallback | None = None,
    measure_base: bool = True,
) -> dict[str, Any]:
    """Fine-tune a copy of `base` (its weights are changed in place: pass a model you own) into an organism.

    Rerunning after a kill resumes from the last checkpoint; a finished directory is refused.
    """
    out = Path(out)
    if (out / GROUND_TRUTH).is_file():
        raise OrganismError(f"{out} already holds a finished organism; choose another --out or delete it")
    if out.exists() and any(out.iterdir()) and not (out / RESUME).is_file() and not (out / "recipe.json").is_file():
        raise OrganismError(f"{out} exists and is not an unfinished organism; choose an empty or new --out")
    out.mkdir(parents=True, exist_ok=True)
    recipe_path = out / "recipe.json"
    if recipe_path.is_file() and json.loads(recipe_path.read_text()) != cfg.to_dict():
        raise OrganismError(f"{out} holds an unfinished organism with another recipe; use its settings or a new --out")
    atomic_write_json(recipe_path, cfg.to_dict())
    t0 = time.perf_counter()
    if progress:
        progress(ProgressEvent("recipe", 0, None, "steps"))
    recipe = build_recipe(cfg, base)
    before = measure(base, cfg.kind, recipe.evals) if measure_base else None
    if progress:
        progress(ProgressEvent("recipe", 1, 1, "steps", f"{len(recipe.train)} examples", finished=True))
    ft = FinetuneConfig(
        steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, warmup_steps=cfg.warmup_steps,
        checkpoints=cfg.checkpoints, max_len=cfg.max_len, seed=cfg.seed,
    )  # fmt: skip
    run = finetune(base, recipe.train, ft, out, progress)
    after = measure(base, cfg.kind, recipe.evals)
    save_model_files(base.hf, base.tokenizer, out)
    gt = {
        "format": FORMAT,
        "kind": cfg.kind,
        "base": base_spec or base.spec,
        "recipe": cfg.to_dict(),
        "planted": recipe.planted,
        "n_examples": len(recipe.train),
        "behaviour": {
            "base": before["rates"] if before else None,
            "organism": after["rates"],
            "examples": after["examples"],
        },
        "training": run,
        "checkpoints": sorted(p.name for p in (out / "checkpoints").iterdir())
        if (out / "checkpoints").is_dir()
        else [],
        "seconds": round(time.perf_counter() - t0, 1),
        "lmscope": __version__,
    }
    atomic_write_json(out / GROUND_TRUTH, gt)
    (out / RESUME).unlink(missing_ok=True)
    return gt
