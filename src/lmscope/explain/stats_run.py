"""Labelling many features with the offline `stats` explainer: in chunks, on one core or several.

Each chunk of `STATS_CHUNK` features reads its evidence in two queries (`AtlasEvidence.evidence_many`); every
context of the atlas is annotated once beforehand (`AtlasEvidence.positions`). A feature's label and its held-out
score depend only on the atlas (evidence, negatives and folds are seeded by the feature id), so chunks can run in
worker processes: with `workers` > 1 (Linux, where processes fork) the annotated contexts are built first, the
write connection is closed, the workers fork (each opens its own read-only connection; no SQLite connection
crosses a fork), the write connection is reopened, and the chunks' results are written in feature order as they
come back, each chunk in one transaction. The labels are the same as on one core (tests/test_explain_pinned.py).
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lmscope.atlas.db.schema import Connection
from lmscope.explain.evidence import AtlasEvidence, FeatureEvidence
from lmscope.explain.labels import open_rw
from lmscope.explain.positions import PositionTable
from lmscope.explain.scorers import ScoreConfig, rule_score
from lmscope.explain.stats_explainer import explain_stats, text_frequencies

STATS_CHUNK = 64  # features per evidence read, per task of a worker and per write transaction
MIN_CHUNKS_PER_WORKER = 2  # fewer chunks than this per worker: label in this process (forking costs more)
MAX_WORKERS = 4

Rows = list[dict[str, Any]]
_STATE: dict[str, Any] = {}  # what forked workers inherit: the evidence source, frequencies, table, config


def default_workers() -> int:
    """One worker per usable core, at most MAX_WORKERS; 1 where processes cannot fork (not Linux)."""
    if not sys.platform.startswith("linux") or "fork" not in multiprocessing.get_all_start_methods():
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(MAX_WORKERS, cores))


def _label(ev_src: AtlasEvidence, ev: FeatureEvidence, freq: dict[str, float], table: PositionTable,
           score_cfg: ScoreConfig | None) -> dict[str, Any]:  # fmt: skip
    f = ev.feature
    lab = explain_stats(ev, freq, ev_src.vocab, kinds=ev_src.kinds, promoted=ev_src.promoted(f), positions=table)
    sc = rule_score("detection", lab.rule, ev, kinds=ev_src.kinds, cfg=score_cfg, positions=table)
    return {"feature": f, "label": lab.text, "confidence": lab.confidence, "score": sc.score, "scorer": sc.scorer}


def _chunk(features: list[int]) -> Rows:
    """A worker's task: label one chunk (its own read-only connection, opened on first use)."""
    from lmscope.atlas.db.schema import open_atlas

    ev_src: AtlasEvidence = _STATE["ev"]
    if _STATE.get("pid") != os.getpid():
        ev_src.conn = open_atlas(_STATE["path"], readonly=True)
        _STATE["pid"] = os.getpid()
    return [_label(ev_src, ev, _STATE["freq"], _STATE["table"], _STATE["cfg"]) for ev in ev_src.evidence_many(features)]


def run_stats(atlas: str | Path, conn: Connection, ev_src: AtlasEvidence, todo: list[int],
              score_cfg: ScoreConfig | None, workers: int | None, write: Callable[[Connection, Rows], None]
              ) -> Connection:  # fmt: skip
    """Label `todo` (scored `rule-detection`), calling `write(conn, rows)` for each chunk in order. Returns the
    connection to go on with (with workers, `conn` is closed and the file reopened)."""
    if not todo:
        return conn
    freq = text_frequencies(ev_src.token_freq(), ev_src.vocab)
    table = ev_src.positions()
    chunks = [todo[i : i + STATS_CHUNK] for i in range(0, len(todo), STATS_CHUNK)]
    n = default_workers() if workers is None else max(1, int(workers))
    n = min(n, len(chunks) // MIN_CHUNKS_PER_WORKER)
    # the table and the contexts live to the end: out of the garbage collector's sight (its full passes over them
    # cost ~9% of the run), and in forked workers their pages stay shared; only if the caller froze nothing
    freeze = gc.get_freeze_count() == 0
    if freeze:
        gc.freeze()
    try:
        if n <= 1 or "fork" not in multiprocessing.get_all_start_methods():
            for chunk in chunks:
                write(conn, [_label(ev_src, ev, freq, table, score_cfg) for ev in ev_src.evidence_many(chunk)])
            return conn
        conn.close()  # no connection may cross the fork
        _STATE.update(ev=ev_src, freq=freq, table=table, cfg=score_cfg, path=str(atlas), pid=os.getpid())
        with multiprocessing.get_context("fork").Pool(n) as pool:
            conn = open_rw(atlas)
            try:
                for rows in pool.imap(_chunk, chunks):
                    write(conn, rows)
            except BaseException:
                conn.close()  # the caller closes the connection it passed, which is closed already
                raise
        return conn
    finally:
        _STATE.clear()
        if freeze:
            gc.unfreeze()
