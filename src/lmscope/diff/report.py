"""`lmscope diff`: every part of a model diff in one resumable run, one report (report.json + report.html).

Parts, each saved as it finishes (`parts/NAME.json`, atomic) so a rerun after a kill skips what is done:
weights, behaviour, activations, crosscoder (+ Latent Scaling and dossiers), knowledge (with `facts`). When
OTHER is an organism the report carries its ground truth and checks the diff against it (`ground_truth_check`).
`search(report, text)` finds the latents, directions and contexts whose evidence contains a string.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from lmscope._version import __version__
from lmscope.core.atomic import atomic_write_json
from lmscope.core.parts import saved_part
from lmscope.core.progress import ProgressCallback
from lmscope.dictionaries.base import Dictionary
from lmscope.dictionaries.metrics import fvu
from lmscope.diff.activations import activation_diff
from lmscope.diff.behaviour import behaviour_diff
from lmscope.diff.crosscoder import (
    CrosscoderConfig,
    encode_pairs,
    paired_activations,
    relative_norms,
    train_crosscoders,
)
from lmscope.diff.dossiers import dossiers
from lmscope.diff.knowledge import KnowledgeConfig, measure_knowledge, verdict
from lmscope.diff.pair import Contexts, check_pair, corpus_contexts
from lmscope.diff.scaling import ROBUST, latent_scaling, robust, summarise
from lmscope.diff.weights import weight_diff
from lmscope.errors import DiffError
from lmscope.model.adapter import Model
from lmscope.organisms.facts import Fact
from lmscope.organisms.organism import GROUND_TRUTH, read_ground_truth

FORMAT = "lmscope-diff/1"


@dataclass
class DiffConfig:
    corpus: str = "stdlib"
    contexts: int = 256  # behaviour and activation diffs
    context: int = 64
    mode: str = "truncate"
    crosscoder_contexts: int = 2048  # paired activations for the crosscoder
    crosscoder: CrosscoderConfig | None = field(default_factory=CrosscoderConfig)  # None: no crosscoder
    knowledge: KnowledgeConfig = field(default_factory=KnowledgeConfig)
    top: int = 10
    latents: int = 24  # OTHER-only latents given dossiers (the highest relative norms first)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def crosscoder_part(
    base: Model, other: Model, cfg: DiffConfig, out: Path, progress: ProgressCallback | None
) -> dict[str, Any]:
    cc = cfg.crosscoder
    assert cc is not None
    hook = cc.hook(base)
    ctx = corpus_contexts(base, cfg.corpus, cfg.crosscoder_contexts, cfg.context, cfg.mode)
    pairs, where = paired_activations(base, other, hook, ctx)
    runs = train_crosscoders(pairs, cc, hook, out / "crosscoder", spec=other.spec, progress=progress)
    held = pairs[-min(len(pairs) // 10 + 1, 8192) :]  # the last tokens, for reconstruction figures
    result: dict[str, Any] = {"hook": hook, "pairs": int(pairs.shape[0]), "config": cc.to_dict(), "runs": {}}
    for name, d in runs.items():
        result["runs"][name] = summarise_crosscoder(d, pairs, where, held, ctx, other, cfg.latents)
    return result


def summarise_crosscoder(
    d: Dictionary, pairs: torch.Tensor, where: torch.Tensor, held: torch.Tensor, ctx: Contexts, other: Model,
    n_latents: int,
) -> dict[str, Any]:  # fmt: skip
    z = encode_pairs(d, pairs)
    fired = (z > 0).any(0)
    rel = relative_norms(d)
    rel = torch.where(fired, rel, torch.full_like(rel, float("nan")))
    with torch.no_grad():
        recon = d.decode(d.encode(held))
    half = pairs.shape[1] // 2
    counts = {
        "other-only": int((rel >= 0.9).sum()), "base-only": int((rel <= 0.1).sum()),
        "shared": int(((rel >= 0.4) & (rel <= 0.6)).sum()), "dead": int((~fired).sum()), "latents": int(rel.numel()),
    }  # fmt: skip
    cand = (rel >= 0.9).nonzero().flatten()
    ok = robust(latent_scaling(d, pairs, cand)) if len(cand) else torch.zeros(0, dtype=torch.bool)
    counts["other-only robust"] = int(ok.sum())
    # dossiers: the robust OTHER-only latents first, then every other latent by relative norm (highest first)
    is_robust = {int(j): bool(v) for j, v in zip(cand, ok, strict=True)}
    ranked = torch.nan_to_num(rel, nan=-1.0).argsort(descending=True)[: n_latents + len(cand)].tolist()
    order = sorted(ranked, key=lambda j: (not is_robust.get(j, False), -float(rel[j])))[:n_latents]
    scaling = latent_scaling(d, pairs, torch.tensor(order, dtype=torch.long)) if order else {}
    extra: dict[int, dict[str, Any]] = {}
    for row in summarise(scaling, torch.tensor(order)) if order else []:
        j = row.pop("latent")
        extra[j] = {"relative_norm": float(rel[j]), **row, "robust": is_robust.get(j, False)}
    hist = torch.histc(rel[rel.isfinite()], bins=20, min=0, max=1).tolist()
    return {
        "arch": d.cfg.arch, "d_sae": d.cfg.d_sae,
        "fvu_base": float(fvu(held[:, :half], recon[:, :half])),
        "fvu_other": float(fvu(held[:, half:], recon[:, half:])),
        "l0": float((z > 0).sum(1).float().mean()), "counts": counts, "relative_norm_hist": hist,
        "robust_threshold": ROBUST,
        "latents": dossiers(other, z, where, ctx, d.W_dec.detach(), order, extra),
    }  # fmt: skip


def run_diff(
    base: Model,
    other: Model,
    out: str | Path,
    cfg: DiffConfig | None = None,
    facts: list[Fact] | None = None,
    control: Model | None = None,
    progress: ProgressCallback | None = None,
) -> dict[str, Any]:
    """Compare BASE with OTHER; write out/report.json and out/report.html; return the report."""
    from lmscope.diff.html import write_html

    cfg = cfg or DiffConfig()
    out = Path(out)
    check_pair(base, other)
    if control is not None:
        check_pair(base, control)
    out.mkdir(parents=True, exist_ok=True)
    meta_path = out / "parts" / "config.json"
    mine = {
        "base": base.spec,
        "other": other.spec,
        "config": cfg.to_dict(),
        "facts": [f.to_json() for f in facts or []],
    }
    if meta_path.is_file() and json.loads(meta_path.read_text()) != mine:
        raise DiffError(f"{out} holds a diff of other models or settings; choose another --out or delete it")
    meta_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(meta_path, mine)
    report: dict[str, Any] = {"format": FORMAT, "lmscope": __version__, "base": base.spec, "other": other.spec,
                              "config": cfg.to_dict()}  # fmt: skip
    ctx = corpus_contexts(base, cfg.corpus, cfg.contexts, cfg.context, cfg.mode)
    report["weights"] = saved_part(out, "weights", lambda: weight_diff(base.hf, other.hf), progress)
    report["behaviour"] = saved_part(out, "behaviour", lambda: behaviour_diff(base, other, ctx, cfg.top), progress)
    acts = lambda: activation_diff(base, other, ctx, top_tokens=cfg.top)  # noqa: E731
    report["activations"] = saved_part(out, "activations", acts, progress)
    if cfg.crosscoder is not None:
        cc = lambda: crosscoder_part(base, other, cfg, out, progress)  # noqa: E731
        report["crosscoder"] = saved_part(out, "crosscoder", cc, progress)
    if facts:

        def know() -> dict[str, Any]:
            m = measure_knowledge(base, other, facts, cfg.knowledge)
            c = measure_knowledge(base, control, facts, cfg.knowledge) if control is not None else None
            return {**m, "control": c}

        k = saved_part(out, "knowledge", know, progress)
        # the verdict is a pure function of the saved measurements: a rerun applies the current rule to them
        report["knowledge"] = {**k, "verdict": verdict(k, k.get("control"), cfg.knowledge)}
    gt_dir = Path(other.spec)
    if (gt_dir / GROUND_TRUTH).is_file():
        gt = read_ground_truth(gt_dir)
        report["ground_truth"] = gt
        report["ground_truth_check"] = ground_truth_check(report, gt)
    atomic_write_json(out / "report.json", report)
    write_html(report, out / "report.html")
    return report


def hit_kind(item: dict[str, Any], text: str) -> str | None:
    """ "on" when the token shown is part of an occurrence of `text`, "after" when `text` occurs in the window just
    before it (the state the string leaves behind), else None."""
    before, token = item.get("before", "").lower(), item.get("token", "").lower()
    t = text.lower()
    window = before + token + item.get("after", "").lower()
    if t not in window or not token.strip():
        return None
    start, k = len(before), window.find(t)
    while k >= 0:  # an occurrence overlapping the token's characters
        if k < start + len(token) and start < k + len(t):
            return "on"
        k = window.find(t, k + 1)
    return "after" if t in before else None


def _count(items: list[dict[str, Any]], text: str) -> tuple[int, int]:
    kinds = [hit_kind(e, text) for e in items]
    return kinds.count("on"), kinds.count("after")


def search(report: dict[str, Any], text: str) -> list[dict[str, Any]]:
    """Every latent, direction, layer and context whose evidence holds `text`: `on` counts examples whose token is
    part of the string, `after` those that follow it (a latent that merely sees it further away does not count)."""
    if not text.strip():
        raise DiffError("search needs a non-empty string")
    hits: list[dict[str, Any]] = []
    for run, r in (report.get("crosscoder") or {}).get("runs", {}).items():
        for rank, lat in enumerate(r["latents"]):
            on, after = _count(lat["examples"], text)
            labels = (lat.get("label", "") + " " + (lat.get("atlas_label") or {}).get("text", "")).lower()
            if on or after or text.lower() in labels:
                hits.append({"where": f"crosscoder {run}", "rank": rank, "latent": lat["latent"],
                             "examples": on + after, "on": on, "after": after, "of": len(lat["examples"]),
                             "robust": lat.get("robust"), "relative_norm": lat.get("relative_norm"),
                             "label": lat["label"]})  # fmt: skip
    for d in (report.get("activations") or {}).get("directions", []):
        on, after = _count(d["top_tokens"], text)
        if on or after:
            hits.append({"where": f"activation direction L{d['layer']} {d['direction']}", "examples": on + after,
                         "on": on, "after": after, "of": len(d["top_tokens"])})  # fmt: skip
    for layer in (report.get("activations") or {}).get("layers", []):
        on, after = _count(layer["top_tokens"], text)
        if on or after:
            hits.append({"where": f"largest per-token change L{layer['layer']}", "examples": on + after,
                         "on": on, "after": after, "of": len(layer["top_tokens"])})  # fmt: skip
    for i, row in enumerate((report.get("behaviour") or {}).get("top", [])):
        if text.lower() in row["prefix"].lower():
            hits.append({"where": "behaviour: top disagreement", "rank": i, "kl": row["kl"]})
    return hits


def ground_truth_check(report: dict[str, Any], gt: dict[str, Any]) -> dict[str, Any]:
    """What the diff should find given what was planted, and whether it did."""
    kind = gt["kind"]
    check: dict[str, Any] = {"kind": kind}
    if kind == "backdoor":
        hits = search(report, gt["planted"]["trigger"])
        top = [h for h in hits if h["where"].startswith("crosscoder") and h.get("rank", 99) < 10 and h["examples"]]
        top_on = [h for h in top if h["on"]]
        direction = [h for h in hits if h["where"].startswith("activation direction")]
        check.update({"trigger": gt["planted"]["trigger"], "hits": hits,
                      "trigger_in_top10_latents": len(top), "trigger_tokens_in_top10_latents": len(top_on),
                      "trigger_in_activation_directions": len(direction),
                      "found": bool(top or direction)})  # fmt: skip
    if "knowledge" in report:
        v = report["knowledge"]["verdict"]["verdict"]
        expected = {"suppress": "suppressed", "overwrite": "not suppressed"}.get(kind)
        check["verdict"] = v
        if expected:
            check["expected"] = expected
            check["correct"] = v == "suppressed" if kind == "suppress" else v != "suppressed"
    cc = (report.get("crosscoder") or {}).get("runs", {})
    check["robust_other_only"] = {name: r["counts"]["other-only robust"] for name, r in cc.items()}
    return check
