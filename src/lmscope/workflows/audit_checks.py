"""The audit's checks that need other layers: from probe to dictionary features, and steering along the probe.

- `feature_links`: at the dictionary's layer, each concept's logistic probe (trained on the battery's train split)
  is compared with every feature: the cosine of its decoder row with the probe direction, and how well the
  feature's activation alone separates the concept on the held-out items (AUROC). The top features get their
  atlas label and page; the concept's words are also searched in the atlas (its labels and examples), each hit
  with its AUROC on the battery.
- `steering_checks`: the probe direction is added at the probe's layer (lmscope.steer's `direction_writer`) while
  the model reads the held-out *negatives*; the check measures how far the next-token log-probabilities move from
  the negatives' toward the positives' (the share of that gap closed, along the tokens where they differ most),
  against a random direction of the same norm. A direction the model uses moves its output; one it merely
  carries does not.

Both write into an audit directory's report (report.json and report.html, atomically) and refresh its lights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmscope.audit.activations import last_token_states
from lmscope.audit.batteries import Battery, Item, battery, read_battery, split_battery
from lmscope.audit.probes import ProbeConfig, auroc, fit_logistic, raw_direction
from lmscope.audit.rare_features import dictionary_hook
from lmscope.audit.report import summary
from lmscope.core.atomic import atomic_write_json
from lmscope.dictionaries.base import Dictionary
from lmscope.errors import AuditError
from lmscope.model.adapter import Model
from lmscope.steer.edits import Edit, direction_writer

STEER_OK = 0.2  # share of the negatives-to-positives gap that a used direction closes, at least
STEER_VERSION = 3  # saved steering parts of another version are recomputed


def _report(directory: Path) -> dict[str, Any]:
    p = directory / "report.json"
    if not p.is_file():
        raise AuditError(f"no audit report at {p}; run `lmscope audit MODEL --out {directory}` first")
    return dict(json.loads(p.read_text()))


def _save(directory: Path, report: dict[str, Any]) -> dict[str, Any]:
    from lmscope.audit.html import write_html

    report["summary"] = summary(report) + extra_lights(report)
    atomic_write_json(directory / "report.json", report)
    write_html(report, directory / "report.html")
    return report


def _battery_items(report: dict[str, Any], name: str) -> tuple[Battery, list[Item]]:
    cfg = report["config"]
    files = {Path(f).stem: f for f in cfg.get("battery_files", [])}
    b = read_battery(files[name]) if name in files else battery(name, cfg.get("seed", 0))
    return b, split_battery(b, cfg.get("seed", 0))


def _logistic_direction(X: np.ndarray, y: np.ndarray, c: float) -> np.ndarray:
    return raw_direction(fit_logistic(X, y, c))


def _row(j: int, cos: np.ndarray, au: np.ndarray, labels: dict[int, Any], pages: bool) -> dict[str, Any]:
    lab = labels.get(j) or {}
    return {"feature": j, "cosine": float(cos[j]), "auroc": float(au[j]), "label": lab.get("text"),
            "page": f"/features/{j}" if pages else None}  # fmt: skip


def _gap_closed(model: Model, texts: list[Any], layer: int, direction: torch.Tensor, value: float,
                base_lp: np.ndarray, gap: np.ndarray, k: np.ndarray) -> float:  # fmt: skip
    """Share of the negatives-to-positives gap (along tokens `k`) closed by adding `value` x unit `direction`."""
    w = direction_writer(direction, Edit(0, "add", value))  # at every position, as activation addition does
    _, lp = last_token_states(model, texts, want_logits=True, layers=[layer], edit={f"blocks.{layer}.resid_post": w})
    assert lp is not None
    moved = lp.mean(0)[k] - base_lp.mean(0)[k]
    return float(moved @ gap[k] / max(float(gap[k] @ gap[k]), 1e-12))


def feature_links(
    model: Model, directory: str | Path, dictionary: Dictionary, atlas: str | Path | None = None, top: int = 8
) -> dict[str, Any]:
    directory = Path(directory)
    report = _report(directory)
    hook = dictionary_hook(dictionary, model, "feature links")
    layer = int(hook.split(".")[1])
    store = None
    if atlas is not None:
        from lmscope.atlas.store import AtlasStore

        store = AtlasStore(atlas)
    W = dictionary.W_dec.detach().float()
    W = W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)
    out: dict[str, Any] = {"dictionary": str(dictionary.cfg.to_dict().get("hook")), "layer": layer,
                           "atlas": str(atlas) if atlas else None, "concepts": {}}  # fmt: skip
    for name in report["concepts"]:
        b, items = _battery_items(report, name)
        acts, _ = last_token_states(model, [it.text for it in items], layers=[layer])
        X = acts[:, 0]
        y = np.array([it.label for it in items])
        tr = np.array([it.split == "train" for it in items])
        held = ~tr
        direction = _logistic_direction(X[tr], y[tr], ProbeConfig().c)
        cos = (W @ torch.from_numpy(direction).float()).numpy()
        with torch.no_grad():
            z = dictionary.to(torch.device("cpu")).float().encode(torch.from_numpy(X[held]).float()).numpy()
        yh = y[held]
        fired = (z > 0).any(0)
        au = np.full(z.shape[1], 0.5)
        for f_ in np.nonzero(fired)[0].tolist():
            au[f_] = auroc(yh, z[:, f_]) or 0.5
        by_cos = np.argsort(-np.abs(cos))[:top]
        by_auroc = np.argsort(-np.abs(au - 0.5))[:top]
        ids = sorted(set(by_cos.tolist()) | set(by_auroc.tolist()))
        labels = store.labels(ids) if store is not None else {}
        found: list[dict[str, Any]] = []
        if store is not None:
            from lmscope.atlas.db.read import FeatureQuery

            for word in b.concept.split():
                if len(word) < 4:
                    continue
                for by in ("label", "text"):
                    hits = store.list_features(FeatureQuery(sort="relevance", q=word, by=by, limit=5))["items"]
                    more = [int(it["id"]) for it in hits]
                    labels |= store.labels(more)
                    for h in more:
                        if h < len(au) and all(f["feature"] != h for f in found):
                            found.append({**_row(h, cos, au, labels, store is not None), "matched": f"{by}: {word}"})
        pages = store is not None
        out["concepts"][name] = {
            "by_cosine": [_row(int(j), cos, au, labels, pages) for j in by_cos],
            "by_auroc": [_row(int(j), cos, au, labels, pages) for j in by_auroc],
            "atlas_search": found, "probe_auroc_at_layer": auroc(yh, X[held] @ direction),
            "best_feature_auroc": float(au[by_auroc[0]]) if len(by_auroc) else None,
        }  # fmt: skip
    report["features"] = out
    return _save(directory, report)


def steering_checks(
    model: Model, directory: str | Path, strength: float = 2.0, tokens: int = 50, seed: int = 0, randoms: int = 4
) -> dict[str, Any]:
    """`strength`: the added vector's norm in units of the concept's mean difference at that layer (|mean of the
    positives - mean of the negatives|, last token, train split). Two directions are added, each at every position:
    the probe's, and the mean difference itself (activation addition); and `randoms` random ones of the same norm
    (one alone is a noisy control at the large norms some concepts need: their mean and largest are reported)."""
    from safetensors.torch import load_file

    directory = Path(directory)
    report = _report(directory)
    dirs = load_file(str(directory / "probes.safetensors"))
    g = torch.Generator().manual_seed(seed)
    out: dict[str, Any] = {"strength": strength, "tokens": tokens, "concepts": {}}
    for name, c in report["concepts"].items():
        part = directory / "parts" / f"steer-{name}.json"
        if part.is_file():  # saved by an earlier run with the same settings: reused (a rerun after a kill resumes)
            try:
                saved = json.loads(part.read_text())
                if saved.get("settings") == [STEER_VERSION, strength, tokens, seed, int(c["layer"]), randoms]:
                    out["concepts"][name] = saved["result"]
                    continue
            except ValueError:
                pass
        _, items = _battery_items(report, name)
        layer = int(c["layer"])
        u = dirs[f"{name}.direction"].float()
        tr = [it for it in items if it.split == "train"]
        held = [it for it in items if it.split != "train"]
        neg = [it for it in held if it.label == 0]
        pos = [it for it in held if it.label == 1]
        a_tr, _ = last_token_states(model, [it.text for it in tr], layers=[layer])
        y = np.array([it.label for it in tr])
        diff = a_tr[y == 1, 0].mean(0) - a_tr[y == 0, 0].mean(0)
        value = strength * float(np.linalg.norm(diff))
        sign = 1.0 if float(diff @ u.numpy()) >= 0 else -1.0
        _, lp_neg = last_token_states(model, [it.text for it in neg], want_logits=True, layers=[layer])
        _, lp_pos = last_token_states(model, [it.text for it in pos], want_logits=True, layers=[layer])
        assert lp_neg is not None and lp_pos is not None
        gap = lp_pos.mean(0) - lp_neg.mean(0)
        k = np.argsort(-np.abs(gap))[:tokens]  # the tokens where positives and negatives differ most
        texts = [it.text for it in neg]
        rand = [torch.randn(u.shape, generator=g) for _ in range(randoms)]
        each = [_gap_closed(model, texts, layer, r, value, lp_neg, gap, k) for r in rand]
        out["concepts"][name] = {
            "layer": layer, "added_norm": value, "negatives": len(neg),
            "gap_closed": _gap_closed(model, texts, layer, sign * u, value, lp_neg, gap, k),
            "mean_diff_gap_closed": _gap_closed(model, texts, layer, torch.from_numpy(diff), value, lp_neg, gap, k),
            "random_gap_closed": float(np.mean(each)), "random_max_abs": float(np.max(np.abs(each))),
            "random_each": each,
        }  # fmt: skip
        settings = [STEER_VERSION, strength, tokens, seed, layer, randoms]
        atomic_write_json(part, {"settings": settings, "result": out["concepts"][name]})
    report["steering"] = out
    return _save(directory, report)


def extra_lights(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Lights for the feature links and the steering checks (after the audit's own)."""
    lights: list[dict[str, Any]] = []
    for name, s in (report.get("steering") or {}).get("concepts", {}).items():
        best = max(s["gap_closed"], s.get("mean_diff_gap_closed", s["gap_closed"]))
        noise = max(2 * abs(s["random_gap_closed"]), s.get("random_max_abs", 0.0))
        used = best >= STEER_OK and best > noise  # beyond twice the random mean and every single random one
        md = s.get("mean_diff_gap_closed")
        light = (f"closes {s['gap_closed']:.0%} of the gap" + (f" (mean difference {md:.0%})" if md is not None else "")
                 + f"; random {s['random_gap_closed']:.0%}"
                 + (f" (largest {s['random_max_abs']:.0%})" if "random_max_abs" in s else ""))  # fmt: skip
        why = ("adding the concept's direction moves the output toward the positives'" if used else
               "adding the concept's direction barely moves the output: the model may carry it without using it "
               "for the next token")  # fmt: skip
        lights.append({"what": f"steering: {name}", "colour": "green" if used else "amber", "light": light, "why": why,
                       "evidence": [f"layer {s['layer']}, added norm {s['added_norm']:.3g} at every position, "
                                    f"{s['negatives']} held-out negatives"]})  # fmt: skip
    for name, f in (report.get("features") or {}).get("concepts", {}).items():
        best = f["by_auroc"][0] if f["by_auroc"] else None
        if best is None:
            continue
        lab = f" ({best['label']})" if best.get("label") else ""
        lights.append({"what": f"features: {name}", "colour": "green" if abs(best["auroc"] - 0.5) >= 0.3 else "amber",
                       "light": f"feature {best['feature']}{lab}: AUROC {best['auroc']:.2f} alone",
                       "why": "the dictionary feature that best separates the concept on held-out items",
                       "evidence": [f"probe at the dictionary's layer: AUROC {f['probe_auroc_at_layer']:.2f}",
                                    f"top decoder cosine {f['by_cosine'][0]['cosine']:+.2f} "
                                    f"(feature {f['by_cosine'][0]['feature']})"]})  # fmt: skip
    return lights
