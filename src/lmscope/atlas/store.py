"""Read-side queries over an atlas file, used by the web server (and usable from Python).

Every value that comes from a user reaches SQL as a bound parameter. Sort columns come from a fixed
whitelist; full-text queries are turned into one quoted FTS5 phrase, so FTS syntax in them is inert.
"""

from __future__ import annotations

import json
import math
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lmscope.atlas.schema import get_meta, label_scores, open_atlas

SORTS = {"id": "id", "density": "density", "max_act": "max_act", "mean_act": "mean_act"}
SEARCH_KINDS = ("label", "text", "token")
MAX_CANDIDATES = 5000


@dataclass
class FeatureQuery:
    """Filters for the feature list. Every field is optional."""

    sort: str = "id"
    order: str = "asc"
    min_density: float | None = None
    max_density: float | None = None
    min_act: float | None = None
    max_act: float | None = None
    dead: bool = True  # include dead features
    q: str | None = None
    by: str = "text"  # label | text | token
    limit: int = 50
    offset: int = 0


def fts_phrase(q: str) -> str:
    """A user's text as one FTS5 phrase: quotes doubled, so operators and column filters mean nothing."""
    return '"' + q.replace('"', '""') + '"'


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
        self.vocab: list[str] = [t for (t,) in conn.execute("SELECT text FROM vocab ORDER BY id")]
        self.n_features = conn.execute("SELECT count(*) FROM features").fetchone()[0]
        self._by_text: dict[str, list[int]] = {}
        for i, t in enumerate(self.vocab):
            self._by_text.setdefault(t.strip().lower(), []).append(i)
        self._overview: dict[str, Any] | None = None

    @property
    def conn(self) -> sqlite3.Connection:
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
        if not ids:
            return {}
        rows = self.conn.execute(
            "SELECT feature, text, source, score, explainer, scorer FROM labels WHERE feature IN "
            "(SELECT value FROM json_each(?)) ORDER BY feature, source = 'human' DESC, "
            "CASE WHEN source = 'human' THEN created END DESC, CASE WHEN source = 'human' THEN id END DESC, "
            "score DESC",
            (json.dumps(ids),),
        )
        out: dict[int, dict[str, Any]] = {}
        for r in rows:
            out.setdefault(r["feature"], {"text": r["text"], "source": r["source"], "score": r["score"],
                                          "explainer": r["explainer"], "scorer": r["scorer"]})  # fmt: skip
        return out

    # ------------------------------------------------------------------ overview
    def overview(self) -> dict[str, Any]:
        if self._overview is None:
            dens = np.array([r[0] for r in self.conn.execute("SELECT density FROM features")], dtype=np.float64)
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
            rows = self.conn.execute(
                "SELECT feature, count(*) AS n, max(act) AS a FROM examples WHERE kind = 'top' AND peak_token IN "
                "(SELECT value FROM json_each(?)) GROUP BY feature ORDER BY n DESC, a DESC LIMIT ?",
                (json.dumps(ids), MAX_CANDIDATES),
            )
            return [r[0] for r in rows]
        kind = "label" if by == "label" else "example"
        # relevance: how many of the feature's top examples (or labels) contain the phrase
        rows = self.conn.execute(
            "SELECT feature, count(*) AS n FROM search WHERE search MATCH ? AND kind = ? "
            "GROUP BY feature ORDER BY n DESC, feature LIMIT ?",
            (fts_phrase(q), kind, MAX_CANDIDATES),
        )
        return [int(r[0]) for r in rows]

    def list_features(self, fq: FeatureQuery) -> dict[str, Any]:
        where, params = [], []
        for col, op, val in (
            ("density", ">=", fq.min_density), ("density", "<=", fq.max_density),
            ("max_act", ">=", fq.min_act), ("max_act", "<=", fq.max_act),
        ):  # fmt: skip
            if val is not None:
                where.append(f"{col} {op} ?")
                params.append(float(val))
        if not fq.dead:
            where.append("dead = 0")
        order_sql = f"{SORTS.get(fq.sort, 'id')} {'DESC' if fq.order == 'desc' else 'ASC'}, id ASC"
        source, head = "features", []
        if fq.q and fq.q.strip():
            # the search's candidates, joined with their rank (the order of relevance)
            source = "features JOIN (SELECT value AS fid, key AS ord FROM json_each(?)) AS c ON c.fid = features.id"
            head = [json.dumps(self._candidates(fq.q, fq.by))]
            if fq.sort == "relevance":
                order_sql = "c.ord"
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        total = self.conn.execute(f"SELECT count(*) FROM {source} {clause}", [*head, *params]).fetchone()[0]
        rows = self.conn.execute(
            f"SELECT id, density, n_fired, mean_act, max_act, dead FROM {source} {clause} ORDER BY {order_sql} "
            "LIMIT ? OFFSET ?",
            [*head, *params, max(0, min(int(fq.limit), 500)), max(0, int(fq.offset))],
        ).fetchall()
        labels = self.labels([r["id"] for r in rows])
        items = [
            {"id": r["id"], "density": r["density"], "n_fired": r["n_fired"], "mean_act": r["mean_act"],
             "max_act": r["max_act"], "dead": bool(r["dead"]), "label": labels.get(r["id"])}
            for r in rows
        ]  # fmt: skip
        return {"total": total, "limit": fq.limit, "offset": fq.offset, "items": items}

    # ------------------------------------------------------------------ one feature
    def _example(self, r: sqlite3.Row, max_act: float) -> dict[str, Any]:
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
        row = c.execute("SELECT * FROM features WHERE id = ?", (int(fid),)).fetchone()
        if row is None:
            return None
        max_act = row["max_act"]
        top: list[dict[str, Any]] = []
        bins: dict[int, list[dict[str, Any]]] = {}
        for r in c.execute(
            "SELECT e.*, c.tokens AS ctx FROM examples e JOIN contexts c ON c.id = e.context WHERE e.feature = ? "
            "ORDER BY e.kind DESC, e.bin, e.rank",
            (int(fid),),
        ):
            ex = self._example(r, max_act)
            (top.append(ex) if r["kind"] == "top" else bins.setdefault(r["bin"], []).append(ex))
        quantiles = [
            {"bin": b["bin"], "lo": b["lo"], "hi": b["hi"], "count": b["count"], "examples": bins.get(b["bin"], [])}
            for b in c.execute("SELECT * FROM quantile_bins WHERE feature = ? ORDER BY bin DESC", (int(fid),))
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
        all_labels = [
            dict(r) for r in c.execute(
                "SELECT id, text, source, explainer, score, scorer, created FROM labels WHERE feature = ? "
                "ORDER BY source = 'human' DESC, created DESC, id DESC", (int(fid),),
            )
        ]  # fmt: skip
        scores = label_scores(c, [lab["id"] for lab in all_labels])  # empty for a v1 file read as it is
        for lab in all_labels:
            lab["scores"] = scores.get(lab["id"], [])
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
