"""`explain_atlas` and `score_atlas`: label features and score labels in an atlas file, resumably.

Evidence is read from the atlas in the calling thread; language-model calls run on a thread pool of
`ops.concurrency`; labels and scores are written back from the calling thread, one transaction each, as results
arrive, so an interrupted run keeps everything finished before it and a rerun skips it. The offline `stats`
explainer works through the features in chunks (stats_run.py), on one core or several; a chunk's labels are
written in one transaction, so an interrupted run keeps every finished chunk.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmscope.atlas.db.schema import Connection
from lmscope.explain.backends import EXPLAINERS, Backend, Caller, make_backend
from lmscope.explain.evidence import AtlasEvidence, FeatureEvidence
from lmscope.explain.labels import (
    labelled,
    labels_to_score,
    open_rw,
    set_score,
    set_scores,
    write_machine_label,
    write_machine_labels,
)
from lmscope.explain.ops import ExplainError, JsonCache, OpsConfig, Usage, run_limited
from lmscope.explain.prompts import explain_messages, parse_label, with_prefill
from lmscope.explain.scorers import SCORERS, Score, ScoreConfig, lm_score, rule_score
from lmscope.explain.stats_run import run_stats

Log = Callable[[str], None]
SCORE_CHUNK = 64  # offline scores written per transaction


@dataclass
class RunReport:
    done: list[dict[str, Any]] = field(default_factory=list)
    skipped: int = 0
    failed: list[tuple[int, str]] = field(default_factory=list)
    usage: Usage = field(default_factory=Usage)
    name: str = ""

    def to_dict(self) -> dict[str, Any]:
        failed = [{"feature": f, "error": e} for f, e in self.failed]
        return {"name": self.name, "done": self.done, "skipped": self.skipped, "failed": failed,
                "usage": self.usage.to_dict()}  # fmt: skip


def default_cache(atlas: str | Path) -> Path:
    p = Path(atlas)
    return p.with_name(p.name + ".llm-cache.json")


def parse_features(spec: str | None) -> list[int] | None:
    """'3,7,10-12' -> [3, 7, 10, 11, 12]; None or '' -> None (all)."""
    if not spec:
        return None
    out: list[int] = []
    try:
        for part in spec.split(","):
            part = part.strip()
            if "-" in part[1:]:
                a, b = part.split("-", 1)
                out += list(range(int(a), int(b) + 1))
            elif part:
                out.append(int(part))
    except ValueError:
        raise ExplainError(f"--features {spec!r} is not a list of ids like 3,7,10-12") from None
    return out


def _backend(kind: str, model: str | None, base_url: str | None, ops: OpsConfig, backend: Backend | None) -> Backend:
    if backend is not None:
        return backend
    if kind not in EXPLAINERS or kind == "stats":
        raise ExplainError(f"unknown backend {kind!r}; choose one of {', '.join(EXPLAINERS)}")
    return make_backend(kind, model=model, base_url=base_url, timeout=ops.timeout)


def _select(ev: AtlasEvidence, features: list[int] | None) -> list[int]:
    if features is None:
        return ev.live_features()
    n = ev.n_features()
    bad = [f for f in features if not 0 <= f < n]
    if bad:
        raise ExplainError(f"feature(s) {bad[:5]} are not in this atlas; features run from 0 to {n - 1}")
    return features


def explain_atlas(
    atlas: str | Path,
    explainer: str = "stats",
    *,
    features: list[int] | None = None,
    limit: int | None = None,
    model: str | None = None,
    base_url: str | None = None,
    ops: OpsConfig | None = None,
    cache: str | Path | None = None,
    redo: bool = False,
    backend: Backend | None = None,
    score_cfg: ScoreConfig | None = None,
    log: Log | None = None,
    workers: int | None = None,
) -> RunReport:
    """Write a machine label for each selected live feature that `explainer` has not labelled yet.

    The `stats` explainer also scores its label offline on the held-out half (scorer `rule-detection`); it runs
    in `workers` processes (default: one per core, up to 4, for runs of many features; see stats_run.py), with
    the same labels as in one.
    Language-model explainers write unscored labels; score them with `score_atlas`.
    """
    log = log or (lambda _m: None)
    ops = ops or OpsConfig()
    if explainer not in EXPLAINERS:
        raise ExplainError(f"unknown explainer {explainer!r}; choose one of {', '.join(EXPLAINERS)}")
    conn = open_rw(atlas)
    report = RunReport()
    try:
        caller = None
        if explainer != "stats":
            b = _backend(explainer, model, base_url, ops, backend)
            b.check()  # a missing key or an unreachable endpoint fails here, before any work
            caller = Caller(b, ops, report.usage, JsonCache(cache if cache is not None else default_cache(atlas)))
            report.name = caller.name
        else:
            report.name = "stats"
        ev_src = AtlasEvidence(conn)
        todo = _select(ev_src, features)
        have = set() if redo else labelled(conn, report.name)
        report.skipped = sum(f in have for f in todo)
        todo = [f for f in todo if f not in have][: limit if limit is not None else None]
        log(f"{report.name}: {len(todo)} features to label, {report.skipped} already labelled (skipped)")
        if caller is None:

            def write(c: Connection, rows: list[dict[str, Any]]) -> None:
                write_machine_labels(c, [(d["feature"], d["label"], d["score"], d["scorer"]) for d in rows], "stats")
                for d in rows:
                    report.done.append(d)
                    log(f"#{d['feature']}: {d['label']}  (confidence {d['confidence']:.2f}, held-out {d['scorer']} "
                        f"{_fmt(d['score'])})")  # fmt: skip

            conn = run_stats(atlas, conn, ev_src, todo, score_cfg, workers, write)
        else:
            evs = dict(zip(todo, ev_src.evidence_many(todo), strict=True))
            c = caller
            small = bool(getattr(c.backend, "prefill", False))  # a local model: prefilled, short answer

            def one(f: int) -> str:
                ev = evs[f]
                if not ev.explain:
                    raise ExplainError("no examples to explain")
                msgs = with_prefill(explain_messages(ev.explain, ev.max_act, 10 if small else 20), "Label:", small)
                return c.call(msgs, parse_label, max_tokens=24 if small else 300)

            for f, res in run_limited(one, todo, ops.concurrency):
                if isinstance(res, Exception):
                    report.failed.append((f, str(res)))
                    log(f"#{f}: failed: {res}")
                    continue
                write_machine_label(conn, f, res, report.name)
                report.done.append({"feature": f, "label": res})
                log(f"#{f}: {res}")
    finally:
        conn.close()
    return report


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def score_atlas(
    atlas: str | Path,
    scorer: str = "detection",
    backend_kind: str = "stats",
    *,
    source: str = "all",
    explainer: str | None = None,
    features: list[int] | None = None,
    limit: int | None = None,
    model: str | None = None,
    base_url: str | None = None,
    ops: OpsConfig | None = None,
    cache: str | Path | None = None,
    redo: bool = False,
    backend: Backend | None = None,
    score_cfg: ScoreConfig | None = None,
    log: Log | None = None,
) -> RunReport:
    """Score labels of the atlas with `scorer` read by `backend_kind` ('stats' runs each label as a rule,
    offline; else a language model). Labels already scored by the same scorer are skipped unless `redo`."""
    log = log or (lambda _m: None)
    ops = ops or OpsConfig()
    if scorer not in SCORERS:
        raise ExplainError(f"unknown scorer {scorer!r}; choose one of {', '.join(SCORERS)}")
    conn = open_rw(atlas)
    report = RunReport()
    try:
        caller = None
        if backend_kind != "stats":
            b = _backend(backend_kind, model, base_url, ops, backend)
            b.check()
            caller = Caller(b, ops, report.usage, JsonCache(cache if cache is not None else default_cache(atlas)))
            name = f"{scorer}:{caller.name}"
        else:
            name = f"rule-{scorer}"
        report.name = name
        rows = labels_to_score(conn, source, explainer, features)
        todo = [r for r in rows if redo or name not in r["scorers"]]
        report.skipped = len(rows) - len(todo)
        todo = todo[: limit if limit is not None else None]
        log(f"{name}: {len(todo)} labels to score, {report.skipped} already scored by it (skipped)")
        ev_src = AtlasEvidence(conn)
        need = list(dict.fromkeys(r["feature"] for r in todo))
        evs: dict[int, FeatureEvidence] = dict(zip(need, ev_src.evidence_many(need), strict=True))
        by_id = {r["id"]: r for r in todo}
        c = caller
        table = ev_src.positions() if c is None and todo else None

        def one(lid: int) -> Score:
            r = by_id[lid]
            ev = evs[r["feature"]]
            if c is None:
                return rule_score(scorer, r["text"], ev, kinds=ev_src.kinds, cfg=score_cfg, positions=table)
            return lm_score(scorer, r["text"], ev, c, cfg=score_cfg)

        # offline scoring reads contexts through the shared connection: keep it on this thread; its scores are
        # written SCORE_CHUNK to a transaction (a language model's, one each, as they arrive)
        pending: list[tuple[int, float]] = []
        for lid, res in run_limited(one, list(by_id), ops.concurrency if c is not None else 1):
            r = by_id[lid]
            if isinstance(res, Exception):
                report.failed.append((r["feature"], str(res)))
                log(f"#{r['feature']} {r['text']!r}: failed: {res}")
                continue
            if res.score is not None and c is None:
                pending.append((lid, round(res.score, 4)))
                if len(pending) >= SCORE_CHUNK:
                    set_scores(conn, pending, name)
                    pending.clear()
            elif res.score is not None:
                set_score(conn, lid, round(res.score, 4), name)
            report.done.append({"feature": r["feature"], "label": r["text"], "source": r["source"],
                                "explainer": r["explainer"], "score": res.score, "scorer": name, "n": res.n,
                                **({"note": res.details["why"]} if "why" in res.details else {})})  # fmt: skip
            log(f"#{r['feature']} {r['text']!r}: {name} {_fmt(res.score)}"
                + (f" ({res.details['why']})" if "why" in res.details else ""))  # fmt: skip
        set_scores(conn, pending, name)
    finally:
        conn.close()
    return report
