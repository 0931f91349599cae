"""`lmscope match A B`: match two dictionaries' features (decoder cosine, activation correlation) against a baseline."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from lmscope.cli.common import DeviceOpt, DtypeOpt, console, err_console, handles_errors, parse_count
from lmscope.errors import LmscopeError

EPILOG = (
    "Examples:\n\n"
    "  lmscope match runs/s0/blocks.10.resid_post-topk-m4608-k32 runs/s1/blocks.10.resid_post-topk-m4608-k32 "
    "--out match.json   (two seeds: decoder cosine, one-to-one)\n\n"
    "  lmscope match narrow/ wide/ --mode many --out split.json   (widths: each wide feature to its best narrow one; "
    "splits counted)\n\n"
    "  lmscope match l9/ l10/ --model smollm2-135m --tokens 100k --out layers.json   (neighbouring layers: decoder "
    "cosine and activation correlation)\n\n"
    "  lmscope match a/ b/ --model org/model-a --other-model org/model-b --corpus data.jsonl --tokens 200k --out x.json"
    "   (two models: activation correlation, tokens aligned by characters when the tokenizers differ)\n\n"
    "Browse the partners: lmscope serve A_ATLAS.db --match match.json [--partner-url http://127.0.0.1:8001]"
)


def _fmt(x: Any, pct: bool = False) -> str:
    if x is None:
        return "–"
    return f"{100 * x:.1f}%" if pct else f"{x:.3f}"


def summary_table(name: str, m: dict[str, Any], report: dict[str, Any]) -> Table:
    """One method's figures, real beside baseline, for A→B and B→A."""
    t = report["config"]["threshold"]
    mode = report["config"]["mode"]
    table = Table(title=f"{name}: {m['score']} ({mode}, threshold {t:g})", title_justify="left")
    for col in ("figure", "A→B", "baseline", "B→A", "baseline "):
        table.add_column(col, justify="left" if col == "figure" else "right")
    s, b = m["summary"], m["baseline_summary"]
    rows = [
        ("features scored", "scored", False), ("mean best score", "mean_max", False),
        (f"best partner ≥ {t:g}", "frac_max_above", True), (f"matched partner ≥ {t:g}", "frac_matched_above", True),
    ]  # fmt: skip
    for label, key, pct in rows:
        cells = [s["a"][key], b["a"][key], s["b"][key], b["b"][key]]
        table.add_row(label, *(str(c) if key == "scored" else _fmt(c, pct) for c in cells))
    q = ("p10", "p50", "p90")
    sides = (s["a"], b["a"], s["b"], b["b"])
    table.add_row("best score p10 / p50 / p90", *(" / ".join(_fmt(x["quantiles"].get(k)) for k in q) for x in sides))
    return table


def splitting_line(m: dict[str, Any], report: dict[str, Any]) -> str | None:
    sp, bs = m["summary"].get("splitting"), m["baseline_summary"].get("splitting")
    if not sp:
        return None
    narrow = sp["narrow"].upper()
    wide = "B" if narrow == "A" else "A"
    h = sp["partners_above"]
    return (f"splitting: {sp['split']:,} of {narrow}'s features ({_fmt(sp['frac_split'], True)}) receive 2+ of "
            f"{wide}'s features scoring ≥ {report['config']['threshold']:g} (0: {h['0']:,}, 1: {h['1']:,}, "
            f"2: {h['2']:,}, 3+: {h['3+']:,}); baseline {bs['split']:,} ({_fmt(bs['frac_split'], True)})")  # fmt: skip


def register(app: typer.Typer) -> None:
    @app.command(epilog=EPILOG)
    @handles_errors
    def match(
        a: Annotated[Path, typer.Argument(help="Dictionary A (lmscope, SAELens or sparsify directory).")],
        b: Annotated[Path, typer.Argument(help="Dictionary B.")],
        out: Annotated[Path, typer.Option(help="The JSON report to write (atomically).")] = Path("match.json"),
        mode: Annotated[
            str, typer.Option(help="hungarian (one-to-one) or many (the wider dictionary onto the narrower).")
        ] = "hungarian",
        threshold: Annotated[float, typer.Option(help="A partner counts when it scores at least this.")] = 0.7,
        by: Annotated[
            str,
            typer.Option(
                help="auto, decoder, activation or both (auto: decoder when the widths allow, activation when "
                "--model is given)."
            ),
        ] = "auto",
        model: Annotated[
            str | None, typer.Option(help="A's model: turns on activation correlation on a shared corpus.")
        ] = None,
        other_model: Annotated[str | None, typer.Option(help="B's model (default: --model).")] = None,
        corpus: Annotated[str, typer.Option(help="Shared corpus: stdlib, files/globs, .jsonl, hf:NAME.")] = "stdlib",
        tokens: Annotated[str, typer.Option(help="Tokens of A's model to read (100k, 1M ...).")] = "65536",
        context: Annotated[int, typer.Option(help="Tokens per context.", min=2)] = 128,
        batch_size: Annotated[int, typer.Option(help="Contexts per forward pass.", min=1)] = 8,
        hook: Annotated[str | None, typer.Option(help="A's hook (default: the one A names).")] = None,
        other_hook: Annotated[str | None, typer.Option(help="B's hook (default: the one B names).")] = None,
        top: Annotated[int, typer.Option(help="Best partners kept per feature in the report.", min=1)] = 3,
        seed: Annotated[int, typer.Option(help="Seed of the baseline's rotation or permutation.")] = 0,
        progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
        device: DeviceOpt = "auto",
        dtype: DtypeOpt = "auto",
    ) -> None:
        """Match the features of dictionaries A and B one-to-one or many-to-one, against a shuffled baseline."""
        from lmscope.cli.progress import RichProgress
        from lmscope.universality.match import match_dictionaries
        from lmscope.universality.report import write_report
        from lmscope.universality.scores import MatchConfig

        if mode not in ("hungarian", "many"):
            raise LmscopeError(f"--mode must be hungarian or many, got {mode!r}")
        if other_model and not model:
            raise LmscopeError("--other-model is B's model for activation correlation; pass A's with --model too")
        cfg = MatchConfig(mode=mode, threshold=threshold, top=top, seed=seed)  # type: ignore[arg-type]
        with RichProgress(enabled=progress and model is not None, console=err_console) as bar:
            report = match_dictionaries(
                a, b, config=cfg, by=by, model=model, other_model=other_model, corpus=corpus,  # type: ignore[arg-type]
                tokens=parse_count(tokens, minimum=2), context=context, batch_size=batch_size, hook=hook,
                other_hook=other_hook, device=device, dtype=dtype, progress=bar,
                log=lambda msg: err_console.print(f"[yellow]note:[/] {msg}", highlight=False, soft_wrap=True),
                command=shlex.join(["lmscope", *sys.argv[1:]]),
            )  # fmt: skip
        path = write_report(report, out)
        for side, path_ in (("A", a), ("B", b)):
            d = report[side.lower()]
            console.print(f"{side}: {path_} ({d['d_sae']:,} features, {d['hook']})", highlight=False)
        ap = report.get("activation_pass")
        if ap:
            src = ap["corpus"] if isinstance(ap["corpus"], dict) else {"spec": ap["corpus"]}
            where = src.get("spec") or src.get("kind")
            console.print(f"activation pass: {ap['shared_tokens']:,} shared tokens of {where} "
                          f"({ap['alignment']}; {ap['model_a']} {ap['hook_a']} / {ap['model_b']} {ap['hook_b']})",
                          highlight=False)  # fmt: skip
        for name, m in report["methods"].items():
            console.print(summary_table(name, m, report))
            line = splitting_line(m, report)
            if line:
                console.print(line, highlight=False)
            width = min(report["a"]["d_sae"], report["b"]["d_sae"])
            same = _fmt(m["summary"]["same_index"], True)
            console.print(f"matched pairs that join feature i with feature i: {same} (independent initialisations: "
                          f"about 1 in {width:,})", highlight=False)  # fmt: skip
            if m.get("silent"):
                console.print(f"silent on the shared tokens (left out): A {len(m['silent']['a']):,}, "
                              f"B {len(m['silent']['b']):,}", highlight=False)  # fmt: skip
        console.print(f"wrote {path} in {report['seconds']:.1f} s", highlight=False)
