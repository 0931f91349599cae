"""`lmscope diff --series BASE CKPT...`: how a fine-tune's change grows over its checkpoints.

Per checkpoint: the relative weight change, the mean KL(CKPT || BASE) on the corpus, the residual change at the
crosscoder's layer, the organism's own behaviour (when the checkpoints belong to an organism: its held-out
measurements, rebuilt from ground_truth.json), and the mean activation of chosen crosscoder latents on
[a_BASE | a_CKPT] pairs: the moment a planted behaviour's latents appear, and how fast they strengthen.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmscope.core.atomic import atomic_write_json
from lmscope.core.progress import ProgressCallback, ProgressEvent
from lmscope.dictionaries.base import Dictionary
from lmscope.diff.behaviour import token_kl
from lmscope.diff.crosscoder import encode_pairs, paired_activations
from lmscope.diff.pair import check_pair, corpus_contexts
from lmscope.diff.weights import weight_diff
from lmscope.errors import DiffError
from lmscope.model.adapter import Model
from lmscope.organisms.behaviour import measure
from lmscope.organisms.recipes import evals_from_ground_truth


def run_series(
    base: Model,
    checkpoints: list[tuple[str, Any]],
    out: str | Path,
    corpus: str = "stdlib",
    contexts: int = 64,
    context: int = 64,
    crosscoder: Dictionary | None = None,
    latents: list[int] | None = None,
    ground_truth: dict[str, Any] | None = None,
    progress: ProgressCallback | None = None,
) -> dict[str, Any]:
    """`checkpoints`: (name, loader) pairs in training order; each loader returns a Model (loaded one at a time).

    The first row is BASE against itself ("BASE", step 0): the latents' activation and the behaviour before any
    training, so the moment a planted change appears is read against its true starting point.
    """
    if not checkpoints:
        raise DiffError("--series needs at least one checkpoint")
    if crosscoder is not None and not latents:
        raise DiffError("tracking a crosscoder needs --latents (the latent ids to follow)")
    ctx = corpus_contexts(base, corpus, contexts, context)
    hook = crosscoder.cfg.hook if crosscoder is not None else None
    evals = evals_from_ground_truth(ground_truth) if ground_truth else None
    rows = []
    steps: list[tuple[str, Any]] = [("BASE", lambda: base), *checkpoints]
    for i, (name, load) in enumerate(steps):
        if progress:
            progress(ProgressEvent("series", i, len(steps), "checkpoints", name))
        m: Model = load()
        check_pair(base, m)
        kl = token_kl(base, m, ctx)
        w = weight_diff(base.hf, m.hf, svd_max=0)["total_relative"]
        row: dict[str, Any] = {"checkpoint": name, "weights_relative": w, "mean_kl": float(kl[~kl.isnan()].mean())}
        if crosscoder is not None and hook is not None and latents:
            pairs, _ = paired_activations(base, m, hook, ctx)
            z = encode_pairs(crosscoder, pairs)[:, latents]
            row["latents"] = {str(j): {"mean": float(z[:, k].mean()), "density": float((z[:, k] > 0).float().mean())}
                              for k, j in enumerate(latents)}  # fmt: skip
            d = pairs.shape[1] // 2
            change = (pairs[:, d:] - pairs[:, :d]).norm(dim=-1).mean() / pairs[:, :d].norm(dim=-1).mean()
            row["resid_change"] = float(change)
        if evals is not None and ground_truth is not None:
            row["behaviour"] = measure(m, ground_truth["kind"], evals)["rates"]
        rows.append(row)
        del m
    result = {"base": base.spec, "corpus": corpus, "hook": hook, "latents": latents, "series": rows,
              "curves": _curves(rows, latents)}  # fmt: skip
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "series.json", result)
    from lmscope.diff.html import write_html

    write_html(result, out / "series.html", "series.html.j2")
    if progress:
        progress(ProgressEvent("series", len(steps), len(steps), "checkpoints", finished=True))
    return result


def _curves(rows: list[dict[str, Any]], latents: list[int] | None) -> dict[str, dict[str, list[float | None]]]:
    """The plotted lines, one list per quantity in checkpoint order (the page draws these; it computes nothing)."""
    curves: dict[str, dict[str, list[float | None]]] = {
        "weights and behaviour": {"|dW|/|W|": [r["weights_relative"] for r in rows],
                                  "mean KL": [r["mean_kl"] for r in rows]},
    }  # fmt: skip
    if rows and rows[0].get("behaviour"):
        curves["behaviour"] = {k: [(r.get("behaviour") or {}).get(k) for r in rows] for k in rows[0]["behaviour"]}
    if latents:
        curves["latents (mean activation)"] = {
            f"latent {j}": [r["latents"][str(j)]["mean"] if "latents" in r else None for r in rows] for j in latents
        }
        curves["latents (density)"] = {
            f"latent {j}": [r["latents"][str(j)]["density"] if "latents" in r else None for r in rows] for j in latents
        }
    return curves
