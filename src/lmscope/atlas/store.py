"""Read-side views of an atlas, used by the web server (and usable from Python): JSON-ready dicts of the
overview, the feature list and search, and one feature's dossier. The queries are in lmscope.atlas.db.
"""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path
from typing import Any

import numpy as np

from lmscope.atlas.db import read
from lmscope.atlas.db.labels import feature_labels, shown_labels
from lmscope.atlas.db.read import SORTS, FeatureQuery, fts_phrase
from lmscope.atlas.db.schema import Connection, Row, get_meta, open_atlas

SEARCH_KINDS = ("label", "text", "token")
MAX_CANDIDATES = 5000

__all__ = ["MAX_CANDIDATES", "SEARCH_KINDS", "SORTS", "AtlasStore", "FeatureQuery", "fts_phrase"]


def _num(x: float) -> float:
    return float(f"{x:.5g}")


class AtlasStore:
    """Thread-safe read-only access to one atlas (one SQLite connection per thread)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._local = threading.local()
        conn = self.conn
        self.summary: dict[str, Any] = get_meta(conn, "summary", {})
        self.metrics: dict[str, Any] = get_meta(conn, "metrics", {})
        self.provenance: dict[str, Any] = get_meta(conn, "provenance", {})
        self.schema_version: int = get_meta(conn, "schema_version")
        self.vocab: list[str] = read.vocab_texts(conn)
        self.n_features = read.count_features(conn)
        self._by_text: dict[str, list[int]] = {}
        for i, t in enumerate(self.vocab):
            self._by_text.setdefault(t.strip().lower(), []).append(i)
        self._overview: dict[str, Any] | None = None

    @property
    def conn(self) -> Connection:
        c = getattr(self._local, "conn", None)
        if c is None:
            c = self._local.conn = open_atlas(self.path, readonly=True)
        return c

    def token_text(self, tid: int) -> str:
        return self.vocab[tid] if 0 <= tid < len(self.vocab) else f"<id {tid}>"

    # ------------------------------------------------------------------ labels
    def labels(self, ids: list[int]) -> dict[int, dict[str, Any]]:
        """The label shown for each feature: the newest human label, else the best-scored machine label; with
        its (latest) score, the scorer that gave it, and the explainer that wrote it (a human's author)."""
        return shown_labels(self.conn, ids)

    # ------------------------------------------------------------------ overview
    def overview(self) -> dict[str, Any]:
        if self._overview is None:
            dens = np.array(read.densities(self.conn), dtype=np.float64)
            alive = dens[dens > 0]
            lo = math.floor(math.log10(alive.min())) if len(alive) else -6
            edges = np.linspace(lo, 0, max(2, 10 * (0 - lo) + 1))
            counts, _ = np.histogram(np.log10(alive), bins=edges) if len(alive) else (np.zeros(len(edges) - 1), None)
            p = self.provenance
            self._overview = {
                "schema_version": self.schema_version,
                "summary": self.summary,
                "metrics": self.metrics,
                "dead": int((dens == 0).sum()),
                "features": len(dens),
                "density_histogram": {"log10_edges": [_num(e) for e in edges], "counts": counts.astype(int).tolist()},
                "provenance": {
                    k: p.get(k) for k in ("lmscope_version", "created", "command", "build_seconds", "hook", "model",
                                          "model_hash", "corpus", "config")
                } | {"dictionary": {k: v for k, v in p.get("dictionary", {}).items() if k != "training"}},
            }  # fmt: skip
        return self._overview

    # ------------------------------------------------------------------ list and search
    def _candidates(self, q: str, by: str) -> list[int]:
        """Feature ids matching a search, most relevant first."""
        q = q.strip()
        if not q:
            return []
        if by == "token":
            ids = self._by_text.get(q.lower(), [])
            if not ids:
                return []
            return read.features_peaking_on(self.conn, ids, MAX_CANDIDATES)
        kind = "label" if by == "label" else "example"
        # relevance: how many of the feature's top examples (or labels) contain the phrase
        return read.features_matching(self.conn, q, kind, MAX_CANDIDATES)

    def list_features(self, fq: FeatureQuery) -> dict[str, Any]:
        candidates = self._candidates(fq.q, fq.by) if fq.q and fq.q.strip() else None
        total, rows = read.feature_page(self.conn, fq, candidates)
        labels = self.labels([r["id"] for r in rows])
        items = [
            {"id": r["id"], "density": r["density"], "n_fired": r["n_fired"], "mean_act": r["mean_act"],
             "max_act": r["max_act"], "dead": bool(r["dead"]), "label": labels.get(r["id"])}
            for r in rows
        ]  # fmt: skip
        return {"total": total, "limit": fq.limit, "offset": fq.offset, "items": items}

    # ------------------------------------------------------------------ one feature
    def _example(self, r: Row, max_act: float) -> dict[str, Any]:
        ctx = np.frombuffer(r["ctx"], dtype="<i4")
        acts = np.frombuffer(r["acts"], dtype="<f4")
        ids = ctx[r["start"] : r["start"] + len(acts)].tolist()
        return {
            "context": r["context"],
            "pos": r["pos"],
            "start": r["start"],
            "peak": r["pos"] - r["start"],
            "act": r["act"],
            "tokens": [self.token_text(t) for t in ids],
            "token_ids": ids,
            "acts": [float(a) for a in acts],
            "text": r["text"],
        }

    def feature(self, fid: int) -> dict[str, Any] | None:
        c = self.conn
        row = read.feature_row(c, fid)
        if row is None:
            return None
        max_act = row["max_act"]
        top: list[dict[str, Any]] = []
        bins: dict[int, list[dict[str, Any]]] = {}
        for r in read.examples_with_contexts(c, fid):
            ex = self._example(r, max_act)
            (top.append(ex) if r["kind"] == "top" else bins.setdefault(r["bin"], []).append(ex))
        quantiles = [
            {"bin": b["bin"], "lo": b["lo"], "hi": b["hi"], "count": b["count"], "examples": bins.get(b["bin"], [])}
            for b in read.quantile_bins(c, fid)
        ]
        hist = json.loads(row["hist"])
        width = hist.get("width", 0.0)
        logits = json.loads(row["logits"]) if row["logits"] else None
        effects = None
        if logits is not None:
            effects = {
                side: [{"token_id": t, "token": self.token_text(t), "value": v} for t, v in logits[side]]
                for side in ("positive", "negative")
            }
        neigh = json.loads(row["neighbours"])
        cof = json.loads(row["cofire"])
        labels = self.labels([fid] + [n for n, _ in neigh] + [n for n, *_ in cof])
        all_labels = feature_labels(c, fid)  # each with every scorer's score (none for a v1 file read as it is)
        return {
            "id": row["id"],
            "label": labels.get(row["id"]),
            "labels": all_labels,
            "density": row["density"],
            "n_fired": row["n_fired"],
            "mean_act": row["mean_act"],
            "max_act": max_act,
            "dead": bool(row["dead"]),
            "histogram": {
                "edges": [_num(i * width) for i in range(len(hist["counts"]) + 1)],
                "counts": hist["counts"],
            },
            "top_examples": top,
            "quantiles": quantiles,
            "logit_effects": effects,
            "logit_note": self.summary.get("logit_note"),
            "neighbours": [{"id": n, "cosine": v, "label": labels.get(n)} for n, v in neigh],
            "cofire": [{"id": n, "count": k, "fraction": fr, "label": labels.get(n)} for n, k, fr in cof],
        }
