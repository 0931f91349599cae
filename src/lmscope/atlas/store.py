"""Read-side views of an atlas, used by the web server (and usable from Python): JSON-ready dicts of the
overview, the feature list and search, and one feature's dossier. The queries are in lmscope.atlas.db.

Special tokens (BOS/EOS/pad): the build leaves them out of every statistic (density, mean and max activation,
histogram) but keeps their activations in the example windows. Each example therefore says which of its tokens
are special (`special`), so that views can grey them and leave them out of colour scales. The special ids are
the build's record of them (provenance `special_token_ids`) or, for an atlas built before that was recorded,
those whose text reads as a special token (`<|...|>`, `<s>`, `<pad>`, ...) plus the BOS that starts every context.
"""

from __future__ import annotations

import json
import math
import re
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
SNIPPET_CHARS = 40  # characters of context either side of a search match
START_POSITION = 1  # a top example at a context position <= this is "at the start" (BOS is position 0)
START_SHARE = 0.5  # a feature with at least this share of its top examples there is flagged
SPECIAL_TEXT = re.compile(
    r"<\|[^|<>\s]{1,60}\|>|</?s>|<(pad|unk|mask|bos|eos|cls|sep)>|\[(PAD|UNK|CLS|SEP|MASK|BOS|EOS)\]", re.IGNORECASE
)
FEATURE_ID = re.compile(r"\s*#?(\d{1,19})\s*")

__all__ = ["MAX_CANDIDATES", "SEARCH_KINDS", "SORTS", "AtlasStore", "FeatureQuery", "fts_phrase", "snippet"]


def _num(x: float) -> float:
    return float(f"{x:.5g}")


def snippet(text: str, start: int, end: int, width: int = SNIPPET_CHARS) -> dict[str, str]:
    """`text[start:end]` as a search hit with up to `width` characters either side: {"pre", "hit", "post"} (an
    ellipsis marks text cut off). Plain text: a view escapes it."""
    pre, post = text[max(0, start - width) : start], text[end : end + width]
    return {
        "pre": ("…" if start > width else "") + pre,
        "hit": text[start:end],
        "post": post + ("…" if end + width < len(text) else ""),
    }


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
        self.is_crosscoder = read.is_crosscoder(conn)  # a two-model crosscoder's atlas (relative norms per latent)
        self._by_text: dict[str, list[int]] = {}
        for i, t in enumerate(self.vocab):
            self._by_text.setdefault(t.strip().lower(), []).append(i)
        self.special_ids: frozenset[int] = self._special_ids()
        self._overview: dict[str, Any] | None = None

    def _special_ids(self) -> frozenset[int]:
        """Token ids of the special tokens (see the module's docstring)."""
        recorded = self.provenance.get("special_token_ids")
        if isinstance(recorded, list):
            return frozenset(int(i) for i in recorded)
        ids = {i for i, t in enumerate(self.vocab) if SPECIAL_TEXT.fullmatch(t)}
        packing = (self.provenance.get("config") or {}).get("packing") or {}
        if packing.get("bos", "context") == "context":
            first = read.first_context_tokens(self.conn)
            if len(first) == 1:  # every context starts with the same token: the BOS
                ids |= first
        return frozenset(ids)

    @property
    def conn(self) -> Connection:
        c = getattr(self._local, "conn", None)
        if c is None:
            c = self._local.conn = open_atlas(self.path, readonly=True)
        return c

    def token_text(self, tid: int) -> str:
        return self.vocab[tid] if 0 <= tid < len(self.vocab) else f"<id {tid}>"

    def feature_id(self, q: str | None) -> int | None:
        """The feature a query names by its id ("787" or "#787"), if there is one."""
        m = FEATURE_ID.fullmatch(q or "")
        fid = int(m.group(1)) if m else -1
        return fid if 0 <= fid < self.n_features else None

    # ------------------------------------------------------------------ labels
    def labels(self, ids: list[int]) -> dict[int, dict[str, Any]]:
        """The label shown for each feature: the newest human label, else the best-scored machine label; with
        its (latest) score, the scorer that gave it, and the explainer that wrote it (a human's author)."""
        return shown_labels(self.conn, ids)

    def max_acts(self, ids: list[int]) -> dict[int, float]:
        """The observed max activation of each of `ids` that exists."""
        return read.max_acts(self.conn, ids)

    def densities(self) -> np.ndarray:
        """Every feature's firing rate on the atlas's corpus, indexed by feature id."""
        return np.array(read.densities(self.conn), dtype=np.float64)

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
                "crosscoder_bands": read.band_counts(self.conn) or None,
                "density_histogram": {"log10_edges": [_num(e) for e in edges], "counts": counts.astype(int).tolist()},
                "provenance": {
                    k: p.get(k) for k in ("lmscope_version", "created", "command", "build_seconds", "hook", "model",
                                          "model_hash", "other", "corpus", "config")
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
        """A page of features. A blank `q` is no query. With a `q` searched by text or token, each item has a
        `snippet` of a top example that matches (None when none shows it), and `start`: whether the feature is
        flagged as firing mainly at the start of a context (see `start_flags`)."""
        q = fq.q if fq.q and fq.q.strip() else None
        candidates = self._candidates(q, fq.by) if q else None
        total, rows = read.feature_page(self.conn, fq, candidates)
        ids = [r["id"] for r in rows]
        labels = self.labels(ids)
        snippets = self.snippets(ids, q, fq.by) if q and fq.by in ("text", "token") else {}
        starts = self.start_flags(ids)
        items = [
            {"id": r["id"], "density": r["density"], "n_fired": r["n_fired"], "mean_act": r["mean_act"],
             "max_act": r["max_act"], "dead": bool(r["dead"]), "label": labels.get(r["id"]),
             "snippet": snippets.get(r["id"]), "start": r["id"] in starts, "relative_norm": r["relative_norm"]}
            for r in rows
        ]  # fmt: skip
        return {"total": total, "limit": fq.limit, "offset": fq.offset, "items": items}

    def start_flags(self, ids: list[int]) -> set[int]:
        """Those of `ids` that fire mainly at the start of a context: at least START_SHARE of their top examples
        are at context position <= START_POSITION (just after the BOS)."""
        counts = read.start_counts(self.conn, ids, START_POSITION)
        return {f for f, (k, n) in counts.items() if n and k / n >= START_SHARE}

    def snippets(self, ids: list[int], q: str, by: str) -> dict[int, dict[str, str]]:
        """For each of `ids`, where its first matching top example matches `q`: the text searched for (case-
        insensitive) for by="text", the peak token for by="token"."""
        out: dict[int, dict[str, str]] = {}
        needle = q.strip().lower()
        token_ids = set(self._by_text.get(needle, [])) if by == "token" else set()
        for r in read.top_example_rows(self.conn, ids):
            f = int(r["feature"])
            if f in out:
                continue
            text: str = r["text"]
            if by == "text":
                i = text.lower().find(needle)
                if i >= 0:
                    out[f] = snippet(text, i, i + len(needle))
            elif int(r["peak_token"]) in token_ids:
                ctx = np.frombuffer(r["ctx"], dtype="<i4")
                i = len("".join(self.token_text(int(t)) for t in ctx[r["start"] : r["pos"]]))
                out[f] = snippet(text, i, i + len(self.token_text(int(r["peak_token"]))))
        return out

    # ------------------------------------------------------------------ one feature
    def _example(self, r: Row, max_act: float) -> dict[str, Any]:
        ctx = np.frombuffer(r["ctx"], dtype="<i4")
        acts = np.frombuffer(r["acts"], dtype="<f4")
        ids = ctx[r["start"] : r["start"] + len(acts)].tolist()
        return {
            "special": [t in self.special_ids for t in ids],
            "context": r["context"],
            "pos": r["pos"],
            "start": r["start"],
            "peak": r["pos"] - r["start"],
            "act": r["act"],
            "tokens": [self.token_text(t) for t in ids],
            "token_ids": ids,
            "acts": [float(a) for a in acts],
            "text": r["text"],
            # the rest of the context, to expand the window (activations are recorded for the window only)
            "before": [self.token_text(int(t)) for t in ctx[: r["start"]]],
            "after": [self.token_text(int(t)) for t in ctx[r["start"] + len(acts) :]],
        }

    def feature(self, fid: int) -> dict[str, Any] | None:
        """Everything about feature `fid` (None if there is no such feature). Besides what the JSON API shows,
        `position`: how many top examples are at the start of a context (`start` of `top`), the largest
        activation on a special token in any example window (`special_max`, 0 if none) and that token's text
        (`special_token`), and `flags`, which of "start" and "special" apply ("special": a special token fires it
        more strongly than any text token, which no statistic shows since they leave special tokens out)."""
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
        special_max, special_token = 0.0, ""
        for ex in top + [e for b in bins.values() for e in b]:
            for a, sp, t in zip(ex["acts"], ex["special"], ex["tokens"], strict=True):
                if sp and a > special_max:
                    special_max, special_token = a, t
        n_start = sum(ex["pos"] <= START_POSITION for ex in top)
        cross = read.crosscoder_latent(c, fid)
        flags = [name for name, on in (
            ("start", bool(top) and n_start / len(top) >= START_SHARE), ("special", special_max > max_act),
        ) if on]  # fmt: skip
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
            "position": {"start": n_start, "top": len(top), "special_max": special_max, "special_token": special_token},
            "flags": flags,
            "crosscoder": cross,
            "relative_norm": cross["relative_norm"] if cross else None,
        }
