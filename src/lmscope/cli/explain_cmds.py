"""`lmscope explain`, `lmscope score` and `lmscope label`: label atlas features, score labels, set human labels."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from lmscope.cli.common import console, err_console, handles_errors

EXPLAIN_EPILOG = (
    "Examples:\n\n"
    "  lmscope explain atlas.db                                   (offline stats explainer, every live feature)\n\n"
    "  lmscope explain atlas.db --explainer anthropic --limit 50  (Claude; needs ANTHROPIC_API_KEY)\n\n"
    "  lmscope explain atlas.db --explainer openai --base-url http://127.0.0.1:8080/v1 --model local  "
    "(llama.cpp / vLLM)\n\n"
    "  lmscope explain atlas.db --explainer local --features 3,7,10-12   (SmolLM2-Instruct on this machine)\n\n"
    "A rerun skips features the explainer already labelled (--redo relabels them); replies are cached in "
    "ATLAS.llm-cache.json. Human labels are never touched."
)
SCORE_EPILOG = (
    "Examples:\n\n"
    "  lmscope score atlas.db --scorer detection                  (offline: each label run as a rule)\n\n"
    "  lmscope score atlas.db --scorer fuzzing --backend anthropic --explainer stats\n\n"
    "  lmscope score atlas.db --scorer simulation --backend openai --base-url http://127.0.0.1:8000/v1 --limit 20\n\n"
    "Detection and fuzzing give balanced accuracy (0.5 = chance), simulation a correlation (0 = chance)."
)
LABEL_EPILOG = (
    'Examples:\n\n  lmscope label atlas.db 123 "digits inside version numbers"\n\n'
    "  lmscope label atlas.db 123 --remove        (drop the human label; machine labels stay)"
)

ExplainerOpt = Annotated[str, typer.Option("--explainer", help="stats (offline), anthropic, openai or local.")]
ModelOpt = Annotated[
    str | None,
    typer.Option("--model", help="Backend model (defaults: claude-sonnet-4-5, gpt-4o-mini, smollm2-135m)."),
]
BaseUrlOpt = Annotated[
    str | None, typer.Option("--base-url", help="Endpoint, e.g. http://127.0.0.1:8080/v1 for a local server.")
]
FeaturesOpt = Annotated[str | None, typer.Option("--features", help="Feature ids: 3,7,10-12 (default: all live).")]
LimitOpt = Annotated[int | None, typer.Option("--limit", help="At most N features / labels this run.", min=0)]
ConcurrencyOpt = Annotated[int, typer.Option("--concurrency", help="Requests in flight at once.", min=1)]
RetriesOpt = Annotated[int, typer.Option("--retries", help="Retries on 429, 5xx and timeouts.", min=0)]
TimeoutOpt = Annotated[float, typer.Option("--timeout", help="Seconds per request.", min=0.1)]
CacheOpt = Annotated[Path | None, typer.Option("--cache", help="Reply cache (default: ATLAS.llm-cache.json).")]
RedoOpt = Annotated[bool, typer.Option("--redo", help="Redo features / labels already done by this explainer.")]
JsonOpt = Annotated[Path | None, typer.Option("--json", help="Also write the run's report as JSON here.")]
AtlasArg = Annotated[Path, typer.Argument(help="An atlas file made by `lmscope atlas`.")]


def _log(msg: str) -> None:
    err_console.print(msg, highlight=False, markup=False, soft_wrap=True)


def _finish(report: object, json_out: Path | None, what: str) -> None:
    from lmscope.core.atomic import atomic_write_json
    from lmscope.explain.pipeline import RunReport

    assert isinstance(report, RunReport)
    console.print(
        f"[green]done[/]: {len(report.done)} {what}, {report.skipped} skipped (already done), "
        f"{len(report.failed)} failed",
        highlight=False,
        soft_wrap=True,
    )
    if report.usage.requests or report.usage.cached:
        console.print(f"usage: {report.usage.summary()}", highlight=False, soft_wrap=True)
    if json_out is not None:
        atomic_write_json(json_out, report.to_dict())
    if report.failed:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    @app.command(epilog=EXPLAIN_EPILOG)
    @handles_errors
    def explain(
        atlas: AtlasArg,
        explainer: ExplainerOpt = "stats",
        model: ModelOpt = None,
        base_url: BaseUrlOpt = None,
        features: FeaturesOpt = None,
        limit: LimitOpt = None,
        concurrency: ConcurrencyOpt = 4,
        retries: RetriesOpt = 4,
        timeout: TimeoutOpt = 60.0,
        cache: CacheOpt = None,
        redo: RedoOpt = False,
        json_out: JsonOpt = None,
        workers: Annotated[
            int | None,
            typer.Option("--workers", help="Processes for the stats explainer (default: one per core, up to 4; "
                         "1 = this process only). The labels are the same either way.", min=1),
        ] = None,
    ) -> None:
        """Label features of an atlas with an explainer; every label records its explainer (and, for stats, its
        held-out score)."""
        from lmscope.explain.ops import OpsConfig
        from lmscope.explain.pipeline import explain_atlas, parse_features

        ops = OpsConfig(concurrency=concurrency, retries=retries, timeout=timeout)
        report = explain_atlas(
            atlas, explainer, features=parse_features(features), limit=limit, model=model, base_url=base_url,
            ops=ops, cache=cache, redo=redo, log=_log, workers=workers,
        )  # fmt: skip
        _finish(report, json_out, "features labelled")

    @app.command(epilog=SCORE_EPILOG)
    @handles_errors
    def score(
        atlas: AtlasArg,
        scorer: Annotated[str, typer.Option("--scorer", help="detection, fuzzing or simulation.")] = "detection",
        backend: Annotated[
            str, typer.Option("--backend", help="stats (offline: the label run as a rule), anthropic, openai, local.")
        ] = "stats",
        model: ModelOpt = None,
        base_url: BaseUrlOpt = None,
        source: Annotated[str, typer.Option("--source", help="Labels to score: all, machine or human.")] = "all",
        explainer: Annotated[
            str | None, typer.Option("--explainer", help="Only labels by this explainer (e.g. stats).")
        ] = None,
        features: FeaturesOpt = None,
        limit: LimitOpt = None,
        concurrency: ConcurrencyOpt = 4,
        retries: RetriesOpt = 4,
        timeout: TimeoutOpt = 60.0,
        cache: CacheOpt = None,
        redo: RedoOpt = False,
        json_out: JsonOpt = None,
    ) -> None:
        """Score labels of an atlas on each feature's held-out examples; the score is stored with the label."""
        from lmscope.explain.ops import ExplainError, OpsConfig
        from lmscope.explain.pipeline import parse_features, score_atlas

        if source not in ("all", "machine", "human"):
            raise ExplainError(f"--source must be all, machine or human, not {source!r}")
        ops = OpsConfig(concurrency=concurrency, retries=retries, timeout=timeout)
        report = score_atlas(
            atlas, scorer, backend, source=source, explainer=explainer, features=parse_features(features),
            limit=limit, model=model, base_url=base_url, ops=ops, cache=cache, redo=redo, log=_log,
        )  # fmt: skip
        _finish(report, json_out, "labels scored")

    @app.command(epilog=LABEL_EPILOG)
    @handles_errors
    def label(
        atlas: AtlasArg,
        feature: Annotated[int, typer.Argument(help="Feature id.", min=0)],
        text: Annotated[str | None, typer.Argument(help="The label (omit with --remove or to show labels).")] = None,
        remove: Annotated[bool, typer.Option("--remove", help="Remove the feature's human label.")] = False,
        author: Annotated[str | None, typer.Option("--author", help="Who wrote it (stored as its explainer).")] = None,
    ) -> None:
        """Set, correct, remove or show the human label of FEATURE. Machines never overwrite human labels."""
        from lmscope.explain.labels import feature_labels, open_rw, remove_human_label, set_human_label

        conn = open_rw(atlas)
        try:
            if remove:
                n = remove_human_label(conn, feature)
                console.print(f"removed {n} human label(s) of feature {feature}", highlight=False, soft_wrap=True)
            elif text is not None:
                set_human_label(conn, feature, text, author=author)
                console.print(f"feature {feature}: human label set", highlight=False, soft_wrap=True)
            rows = feature_labels(conn, feature)
        finally:
            conn.close()
        for r in rows:
            sc = "" if r["score"] is None else f", {r['scorer']} {r['score']:.2f}"
            who = f", {r['explainer']}" if r["explainer"] else ""
            console.print(
                f"  {json.dumps(r['text'], ensure_ascii=False)}  ({r['source']}{who}{sc})",
                highlight=False,
                soft_wrap=True,
            )
        if not rows:
            console.print(f"  feature {feature} has no labels", highlight=False, soft_wrap=True)
