"""`lmscope demo`: the whole MRI of a model in one command (harvest, train, evaluate, atlas, labels, serve)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from lmscope.cli.common import DeviceOpt, DtypeOpt, console, handles_errors, parse_count
from lmscope.cli.progress import RichProgress
from lmscope.workflows.demo import STEER_PROMPT, Demo, DemoConfig, demo_summary
from lmscope.workflows.pipeline import Stage, StageOutcome

EPILOG = """Examples:

  lmscope demo                                  (SmolLM2-135M-Instruct on the stdlib corpus, then serve)

  lmscope demo --quick --no-serve               (a minutes-long smoke run of the same pipeline)

  lmscope demo --model ./my-model --corpus data/*.txt --layer 8 --tokens 500k --run-dir runs/mine

A rerun skips the stages whose outputs verify, so an interrupted demo continues where it stopped."""


def register(app: typer.Typer) -> None:
    @app.command(epilog=EPILOG)
    @handles_errors
    def demo(
        model: Annotated[str, typer.Option(help="Model spec (default: the embedded SmolLM2).")] = "smollm2-135m",
        corpus: Annotated[str, typer.Option(help="Corpus spec (default: the embedded stdlib corpus).")] = "stdlib",
        layer: Annotated[
            int | None, typer.Option(help="Block whose resid_post is scanned (default n_layers // 3).")
        ] = None,
        tokens: Annotated[str | None, typer.Option(help="Tokens to harvest (training reads them twice).")] = None,
        quick: Annotated[bool, typer.Option(help="A minutes-long version of the same pipeline.")] = False,
        run_dir: Annotated[
            Path | None, typer.Option(help="Where everything is written (default runs/demo[-quick]).")
        ] = None,
        restart: Annotated[bool, typer.Option(help="Delete the run directory first and start over.")] = False,
        serve: Annotated[bool, typer.Option(help="Serve the web explorer at the end.")] = True,
        host: Annotated[str, typer.Option(help="Address to serve on.")] = "127.0.0.1",
        port: Annotated[int, typer.Option(help="Port to serve on.")] = 8000,
        device: DeviceOpt = "auto",
        dtype: DtypeOpt = "auto",
    ) -> None:
        """Run the main job: harvest a layer, train a TopK dictionary, evaluate it, build the atlas, label and
        score every feature offline, print a summary and serve the web explorer."""
        overrides: dict = {"model": model, "corpus": corpus, "layer": layer}
        if tokens is not None:
            n = parse_count(tokens, minimum=1)
            overrides.update(harvest_tokens=n, train_tokens=2 * n)
        cfg = DemoConfig.quick(**overrides) if quick else DemoConfig(**overrides)
        run_dir = run_dir or Path("runs") / ("demo-quick" if quick else "demo")
        if restart and run_dir.exists():
            shutil.rmtree(run_dir)
        bars = RichProgress()
        job = Demo(cfg, run_dir, device=device, dtype=dtype, progress=bars)
        console.print(f"[bold]lmscope demo[/] → {run_dir}  ({cfg.model}, corpus {cfg.corpus})")
        start = time.perf_counter()

        def on_start(stage: Stage, i: int, n: int) -> None:
            console.rule(f"[{i}/{n}] {stage.description}")

        def on_end(stage: Stage, outcome: StageOutcome) -> None:
            how = "verified, skipped" if outcome.skipped else f"{outcome.seconds:.0f} s"
            console.print(f"[green]✓[/] {stage.name} ({how})")

        with bars:
            job.pipeline().run(on_start=on_start, on_end=on_end)
        summary = demo_summary(job)
        summary["total_seconds"] = time.perf_counter() - start
        print_summary(summary)
        if serve:
            import uvicorn

            from lmscope.web.app import Live, create_app

            console.print(f"\n[bold]Serving the atlas at http://{host}:{port}/[/]  (Ctrl-C to stop)")
            live = Live(job.model, job.dictionary())
            app_ = create_app(run_dir / "atlas.db", live=live, graphs=run_dir / "graphs", audits=run_dir / "audits")
            uvicorn.run(app_, host=host, port=port, log_level="warning")


def print_summary(s: dict) -> None:
    m = s["metrics"]
    t = Table("metric", "value", title="dictionary")
    t.add_row("hook", s["hook"])
    t.add_row("features (live)", f"{s['features']} ({s['live']} live)")
    for key, label in [
        ("fvu", "FVU"),
        ("l0", "L0"),
        ("dead_frac", "dead fraction"),
        ("ce_recovered", "CE loss recovered"),
    ]:
        if key in m:
            t.add_row(label, f"{m[key]:.3f}")
    console.print(t)
    if s.get("labels"):
        lt = Table(
            "feature", "label (stats explainer)", "detection", "fuzzing", "max act",
            title="most clearly labelled features (held-out offline scores)",
        )  # fmt: skip
        for row in s["labels"]:
            fuzz = "" if row["fuzzing"] is None else f"{row['fuzzing']:.2f}"
            lt.add_row(str(row["feature"]), row["text"], f"{row['detection']:.2f}", fuzz, f"{row['max_act']:.1f}")
        console.print(lt)
    if s.get("steer"):
        st = s["steer"]
        if st["raises_its_tokens"]:
            effect = (
                f"raised the rate of its tokens ({', '.join(map(repr, st['tokens']))}, ...) in a greedy continuation "
                f"from {st['baseline']:.0%} to {st['steered']:.0%}"
            )
        else:
            effect = (
                "did not raise its own tokens' rate in this short check, but changed the model's behaviour "
                f"(KL at the first generated token {st['kl']:.2f})"
            )
        console.print(
            f"\nTry steering. Checked just now: clamping feature {st['feature']} to {st['value']:g} {effect}.",
            highlight=False,
        )
        console.print(
            f"  baseline: {STEER_PROMPT!r} + {st['baseline_text']!r}\n  steered:  ... + {st['steered_text']!r}",
            highlight=False,
        )
        console.print(f"  [bold]{st['command']}[/]", highlight=False)
    if s.get("circuit"):
        c = s["circuit"]
        u, p = c["scores"]["unpruned"], c["scores"]["pruned"]
        console.print(
            f"\nAttribution graph of {c['prompt']!r} → {', '.join(map(repr, c['targets']))}: replacement "
            f"{u['replacement']:.2f} / completeness {u['completeness']:.2f} (pruned: {p['replacement']:.2f} / "
            f"{p['completeness']:.2f}); open /graphs/{c['slug']} in the explorer. Another prompt:",
            highlight=False,
        )
        console.print(f"  [bold]{c['command']}[/]", highlight=False)
    if s.get("audit"):
        a = s["audit"]
        at = Table("finding", "light", title="audit (open /audits/demo in the explorer)")
        colour = {"green": "green", "amber": "yellow", "red": "red", "grey": "bright_black"}
        for light in a["lights"]:
            at.add_row(light["what"], f"[{colour.get(light['colour'], 'white')}]●[/] {light['light']}")
        console.print(at)
        console.print(f"  another audit: [bold]{a['command']}[/]", highlight=False)
    console.print(f"\nRun directory: {s['run_dir']} · total {s['total_seconds']:.0f} s")
