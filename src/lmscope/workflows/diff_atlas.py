"""A diff's crosscoder as an atlas: "what is new in the fine-tune", browsable and searchable like any dictionary.

`crosscoder_atlas` builds the SQLite atlas of a trained crosscoder over [BASE | OTHER] on the diff's corpus
(every latent: top and quantile examples, density, histogram, OTHER-side logit effects, neighbours, its relative
norm and band), writes the Latent Scaling ratios the diff measured for its dossier latents, labels those latents
with the offline `stats` explainer (scored on held-out examples), and links the atlas and the labels into the
report. Each step resumes: a finished atlas is reused (an unfinished one is rebuilt), labelled latents are skipped.
Browse it with `lmscope serve DIFF/crosscoder/batchtopk.atlas.db --diffs ...`; search its labels and examples there
or with `lmscope diff-search`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from lmscope.atlas import AtlasConfig, build_atlas
from lmscope.atlas.db import open_for_writing
from lmscope.atlas.db.labels import shown_labels
from lmscope.atlas.db.read import band_counts, live_feature_ids
from lmscope.atlas.db.write import write_latent_scaling
from lmscope.core.atomic import atomic_write_json
from lmscope.core.progress import ProgressCallback
from lmscope.corpora import PackingConfig
from lmscope.errors import DiffError
from lmscope.explain.pipeline import explain_atlas
from lmscope.model.adapter import Model


def atlas_path(directory: Path, run: str = "batchtopk") -> Path:
    return directory / "crosscoder" / f"{run}.atlas.db"


def _report(directory: Path) -> dict[str, Any]:
    path = directory / "report.json"
    if not path.is_file():
        raise DiffError(f"no diff report at {path}; run `lmscope diff BASE OTHER --out {directory}` first")
    return dict(json.loads(path.read_text()))


def crosscoder_atlas(
    base: Model,
    other: Model,
    directory: str | Path,
    tokens: int = 65_536,
    run: str = "batchtopk",
    progress: ProgressCallback | None = None,
    log: Any = None,
) -> dict[str, Any]:
    """Build (or reuse) the atlas of the diff's crosscoder `run`, label its dossier latents, put both in the report
    (report.json and report.html, rewritten atomically); returns the report."""
    from lmscope.diff.html import write_html

    directory = Path(directory)
    report = _report(directory)
    runs = (report.get("crosscoder") or {}).get("runs", {})
    if run not in runs:
        have = ", ".join(runs) or "none (the diff ran without --crosscoder)"
        raise DiffError(f"the diff at {directory} has no crosscoder run {run!r}; it has: {have}")
    if report["base"] != base.spec or report["other"] != other.spec:
        raise DiffError(
            f"the diff at {directory} compares {report['base']} with {report['other']}, not {base.spec} with "
            f"{other.spec}"
        )
    cfg = report["config"]
    out = atlas_path(directory, run)
    if not out.is_file():
        packing = PackingConfig(context=cfg["context"], mode=cfg.get("mode", "truncate"))  # as the diff read it
        acfg = AtlasConfig(tokens=tokens, context=cfg["context"], batch_size=8, packing=packing)
        build_atlas(base, directory / "crosscoder" / run, cfg["corpus"], out=out, config=acfg, other=other,
                    progress=progress, log=log, command=f"lmscope diff ... --atlas (crosscoder {run})")  # fmt: skip
    latents = runs[run]["latents"]
    ids = [int(lat["latent"]) for lat in latents]
    conn = open_for_writing(out)
    try:
        write_latent_scaling(conn, [(int(lat["latent"]), lat.get("nu_error"), lat.get("nu_recon"),
                                     bool(lat.get("robust"))) for lat in latents if "nu_error" in lat])  # fmt: skip
        live = set(live_feature_ids(conn))
    finally:
        conn.close()
    explained = explain_atlas(out, "stats", features=[j for j in ids if j in live], log=log)  # dead ones: no label
    conn = open_for_writing(out)
    try:
        shown = shown_labels(conn, ids)
        bands = band_counts(conn)
    finally:
        conn.close()
    for lat in latents:
        lab = shown.get(int(lat["latent"]))
        if lab is not None:
            lat["atlas_label"] = {"text": lab["text"], "score": lab.get("score"), "scorer": lab.get("scorer")}
    runs[run]["atlas"] = {"path": str(out.relative_to(directory)), "tokens": tokens, "bands": bands,
                          "labelled": len(explained.done) + explained.skipped}  # fmt: skip
    atomic_write_json(directory / "report.json", report)
    write_html(report, directory / "report.html")
    return report


def search_atlas(
    directory: str | Path, text: str, run: str = "batchtopk", limit: int = 20, candidates: int = 500
) -> list[dict[str, Any]]:
    """The crosscoder latents of the diff's atlas whose top examples fire on `text` (`on`: the peak token is part of
    it) or right after it (`after`: it is in the window before the peak), or whose label holds it; ranked by those
    examples, then by relative norm (what changed most first). Each: id, on, after, of (top examples),
    relative_norm, density, label. [] when the diff has no atlas. (A plain full-text match would rank every latent
    whose window merely shows the string, which is most of them on a corpus where the string is frequent.)"""
    from lmscope.atlas.db.read import FeatureQuery, top_example_rows
    from lmscope.atlas.store import AtlasStore
    from lmscope.diff.report import hit_kind

    path = atlas_path(Path(directory), run)
    if not path.is_file():
        return []
    store = AtlasStore(path)
    found: dict[int, dict[str, Any]] = {}
    for by in ("text", "label"):
        res = store.list_features(FeatureQuery(sort="relevance", q=text, by=by, limit=candidates))
        for it in res["items"]:
            lab = it.get("label") or {}
            found.setdefault(int(it["id"]), {
                "id": int(it["id"]), "on": 0, "after": 0, "of": 0, "relative_norm": it["relative_norm"],
                "density": it["density"], "label": lab.get("text", ""),
                "label_match": text.lower() in lab.get("text", "").lower(),
            })  # fmt: skip
    for r in top_example_rows(store.conn, list(found)):
        ctx = np.frombuffer(r["ctx"], dtype="<i4")
        before = "".join(store.token_text(int(t)) for t in ctx[r["start"] : r["pos"]])
        token = store.token_text(int(r["peak_token"]))
        item = {"before": before, "token": token, "after": r["text"][len(before) + len(token) :]}
        f = found[int(r["feature"])]
        f["of"] += 1
        kind = hit_kind(item, text)
        if kind is not None:
            f[kind] += 1
    hits = [f for f in found.values() if f["on"] or f["after"] or f["label_match"]]
    hits.sort(key=lambda f: (-(f["on"] + f["after"]), not f["label_match"], -(f["relative_norm"] or 0)))
    return hits[:limit]
