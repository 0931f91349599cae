"""`match_dictionaries`: match the features of dictionary A with those of dictionary B, against a shuffled baseline.

Two ways to score a pair of features, each reported with its own baseline:

- `decoder`: the cosine of their decoder rows. Needs the same output width (one model, or one residual width);
  meaningful for other seeds and widths at one hook, and for neighbouring layers of the residual stream.
- `activation`: the Pearson correlation of their activations over the tokens of a shared corpus. Needs the models;
  works across models, tokenizers and widths (see `correlate.py` and `align.py`).

`by="auto"` scores by decoder cosine when the widths allow it and by activation correlation when a model is given
(both when both). The result is a JSON-ready report (`report.py` writes, reads and queries it).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np

from lmscope.core.progress import ProgressCallback
from lmscope.corpora import Corpus, open_corpus
from lmscope.dictionaries.base import Dictionary
from lmscope.dictionaries.formats import dictionary_hash
from lmscope.dictionaries.pretrained import open_dictionary
from lmscope.errors import MatchError
from lmscope.model.adapter import Model
from lmscope.universality import correlate, decoder
from lmscope.universality.report import FORMAT, VERSION
from lmscope.universality.scores import MatchConfig, block_rows, match_blocks, per_feature, summarize

By = Literal["auto", "decoder", "activation", "both"]
SHARED_INIT = 0.2  # a same-index fraction of matched pairs above this is no chance (chance: about 1 / width)


def _describe(d: Dictionary, path: str | None, hook: str | None) -> dict[str, Any]:
    c = d.cfg
    return {"path": path, "sha256": dictionary_hash(d), "arch": c.arch, "d_in": c.d_in, "d_out": c.d_out,
            "d_sae": c.d_sae, "k": c.k, "hook": hook, "hook_out": c.hook_out, "model": c.model}  # fmt: skip


def _load(x: Dictionary | str | Path, hook: str | None) -> tuple[Dictionary, str | None]:
    """A dictionary and its resolved path (None for one given as an object); any format lmscope reads."""
    if isinstance(x, Dictionary):
        return x, None
    if not Path(x).exists():
        raise MatchError(f"{x} does not exist; pass a dictionary (an lmscope, SAELens or sparsify directory, or a "
                         "Gemma Scope file)")  # fmt: skip
    return open_dictionary(x, hook=hook), str(Path(x).resolve())


def _methods(da: Dictionary, db: Dictionary, by: str, has_model: bool) -> list[str]:
    wa, wb = int(da.cfg.d_out or da.cfg.d_in), int(db.cfg.d_out or db.cfg.d_in)
    if by not in ("auto", "decoder", "activation", "both"):
        raise MatchError(f"--by must be auto, decoder, activation or both, got {by!r}")
    if wa != wb and (by in ("decoder", "both") or not has_model):
        raise MatchError(
            f"A writes {wa}-dimensional decoder directions and B {wb}-dimensional ones, so decoder cosine cannot "
            "compare them; match by activation correlation instead: pass --model MODEL_A --other-model MODEL_B and "
            "a shared --corpus"
        )
    if by in ("activation", "both") and not has_model:
        raise MatchError("activation correlation runs the models: pass --model MODEL (and --other-model for B's)")
    if by == "auto":
        return (["decoder"] if wa == wb else []) + (["activation"] if has_model else [])
    return ["decoder", "activation"] if by == "both" else [by]


def _model_name(d: Dictionary) -> str | None:
    """The model spec a dictionary records (a trained one records the harvest's model record, a dict)."""
    m: Any = d.cfg.model
    return (m.get("spec") or m.get("hash")) if isinstance(m, dict) else m


def _notes(
    ha: str | None, hb: str | None, da: Dictionary, db: Dictionary, methods: list[str], log: Callable[[str], None]
) -> None:
    if "decoder" not in methods:
        return
    if ha and hb and ha != hb:
        log(f"A reads {ha} and B {hb}: decoder cosine compares directions across hooks, which is meaningful "
            "for the residual stream (layers share its basis) and not for other hook pairs")  # fmt: skip
    ma, mb = _model_name(da), _model_name(db)
    if ma and mb and ma != mb:
        log(f"A was trained on {ma} and B on {mb}: decoder cosine across models is meaningful only when one is a "
            "fine-tune of the other; activation correlation (--model, --other-model) compares any two")  # fmt: skip


def _method(
    name: str, blocks: Any, base: Any, m_a: int, m_b: int, cfg: MatchConfig,
    alive: tuple[np.ndarray | None, np.ndarray | None], score: str, baseline: str,
) -> dict[str, Any]:  # fmt: skip
    """Match on the real scores and on the baseline's, and summarise both."""
    started = time.time()
    real = match_blocks(blocks, m_a, m_b, cfg)
    shuffled = match_blocks(base, m_a, m_b, cfg)
    return {
        "method": name, "score": score, "baseline": baseline, "seconds": round(time.time() - started, 2),
        "summary": summarize(real, cfg.threshold, *alive),
        "baseline_summary": summarize(shuffled, cfg.threshold, *alive),
        "features": {"a": per_feature(real, "a"), "b": per_feature(real, "b")},
    }  # fmt: skip


def match_dictionaries(
    a: Dictionary | str | Path,
    b: Dictionary | str | Path,
    *,
    config: MatchConfig | None = None,
    by: By = "auto",
    model: Model | str | None = None,
    other_model: Model | str | None = None,
    corpus: Corpus | str = "stdlib",
    tokens: int = 65_536,
    context: int = 128,
    batch_size: int = 8,
    hook: str | None = None,
    other_hook: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    progress: ProgressCallback | None = None,
    log: Callable[[str], None] | None = None,
    command: str | None = None,
) -> dict[str, Any]:
    """Match A's features with B's and return the report (see docs/universality.md for its fields).

    `model` (A's model; B's is `other_model`, default the same) turns on activation correlation over `tokens` tokens
    of `corpus`; `hook` / `other_hook` override the hooks the dictionaries name. `log` receives one-line notes (hooks
    or models that differ); `progress` events of task "match" count the activation pass's tokens.
    """
    from lmscope._version import __version__

    cfg = config or MatchConfig()
    log = log or (lambda _msg: None)
    started = time.time()
    da, pa = _load(a, hook)
    db, pb = _load(b, other_hook)
    methods = _methods(da, db, by, model is not None)
    # a path was opened with its hook already replaced (in lmscope's names); a Dictionary object keeps its own cfg
    ha = hook if hook is not None and pa is None else da.cfg.hook
    hb = other_hook if other_hook is not None and pb is None else db.cfg.hook
    _notes(ha, hb, da, db, methods, log)
    m_a, m_b = da.cfg.d_sae, db.cfg.d_sae
    out: dict[str, Any] = {
        "format": FORMAT, "version": VERSION, "lmscope_version": __version__, "command": command,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "a": _describe(da, pa, ha), "b": _describe(db, pb, hb),
        "config": cfg.to_dict(), "methods": {}, "activation_pass": None,
    }  # fmt: skip
    sides = _sides(da, db, ha, hb, model, other_model, corpus, device, dtype, log) if "activation" in methods else None
    if "decoder" in methods:
        rows = block_rows(m_b, cfg, bytes_per=4)
        wa, wb = da.decoder_directions, db.decoder_directions
        turned = decoder.rotated(wb, cfg.seed)
        out["methods"]["decoder"] = _method(
            "decoder", decoder.cosine_blocks(wa, wb, rows), decoder.cosine_blocks(wa, turned, rows),
            m_a, m_b, cfg, (None, None), "cosine of the decoder rows",
            f"B's decoder rows turned by a random rotation (seed {cfg.seed}): B's own geometry, no shared direction",
        )  # fmt: skip
    if sides is not None:
        out["methods"]["activation"], out["activation_pass"] = _activation(
            *sides, cfg, tokens, context, batch_size, progress
        )
    shared = [n for n, m in out["methods"].items() if m["summary"]["same_index"] > SHARED_INIT]
    if shared:
        frac = out["methods"][shared[0]]["summary"]["same_index"]
        log(
            f"{100 * frac:.0f}% of the matched pairs join feature i with feature i: A and B most likely share their "
            "initialisation (the same seed, or a narrower dictionary drawn as the first rows of a wider one with the "
            "same seed), so the match measures it as much as the training; train them with different --seed values"
        )
    out["seconds"] = round(time.time() - started, 2)
    return out


def _sides(
    da: Dictionary, db: Dictionary, ha: str | None, hb: str | None, model: Model | str | None,
    other_model: Model | str | None, corpus: Corpus | str, device: str, dtype: str, log: Callable[[str], None],
) -> tuple[correlate.Side, correlate.Side, Corpus]:  # fmt: skip
    """Both sides of the activation pass, checked before any work: hooks named and on the model, widths right."""
    from lmscope.model.loading import load_model

    for name, h in (("A", ha), ("B", hb)):
        if not h:
            flag = "--hook" if name == "A" else "--other-hook"
            raise MatchError(f"dictionary {name} names no hook (cfg.hook); pass {flag}, e.g. blocks.6.resid_post")
    assert model is not None and ha is not None and hb is not None
    ma = load_model(model, device=device, dtype=dtype) if isinstance(model, str) else model
    if other_model is None or other_model == model or (isinstance(other_model, str) and other_model == ma.spec):
        mb = ma
    else:
        mb = load_model(other_model, device=device, dtype=dtype) if isinstance(other_model, str) else other_model
    for name, d, m in (("A", da, ma), ("B", db, mb)):
        if _model_name(d) and _model_name(d) != m.spec:
            log(f"dictionary {name} records the model {_model_name(d)!r} but runs on {m.spec!r} here")
    side_a, side_b = correlate.Side(ma, da, ha), correlate.Side(mb, db, hb)
    correlate.check_widths(side_a, side_b)
    return side_a, side_b, open_corpus(corpus) if isinstance(corpus, str) else corpus


def _activation(
    side_a: correlate.Side, side_b: correlate.Side, src: Corpus, cfg: MatchConfig, tokens: int, context: int,
    batch_size: int, progress: ProgressCallback | None,
) -> tuple[dict[str, Any], dict[str, Any]]:  # fmt: skip
    da, db = side_a.dictionary, side_b.dictionary
    started = time.time()
    codes = correlate.collect_codes(side_a, side_b, src, tokens, context, batch_size, progress)
    pass_seconds = round(time.time() - started, 2)
    silent_a, silent_b = correlate.silent(codes.za), correlate.silent(codes.zb)
    rows = block_rows(db.cfg.d_sae, cfg)
    perm = correlate.baseline_permutation(codes.n, cfg.seed)
    method = _method(
        "activation", correlate.correlation_blocks(codes, rows), correlate.correlation_blocks(codes, rows, perm),
        da.cfg.d_sae, db.cfg.d_sae, cfg, (~silent_a, ~silent_b),
        "Pearson correlation of the activations over the shared tokens",
        f"B's activations in a random order of the shared tokens (seed {cfg.seed}): same firing rates, no co-firing",
    )  # fmt: skip
    method["silent"] = {"a": np.flatnonzero(silent_a).tolist(), "b": np.flatnonzero(silent_b).tolist()}
    return method, {**correlate.describe_pass(codes, side_a, side_b, src), "seconds": pass_seconds}
