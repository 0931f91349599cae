"""`lmscope demo`: the whole MRI of a model in one command (harvest, train, evaluate, atlas, labels, serve)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from lmscope.cli.common import DeviceOpt, DtypeOpt, console, handles_errors, parse_count
from lmscope.cli.progress import RichProgress
from lmscope.errors import LmscopeError
from lmscope.workflows.demo import Demo, DemoConfig, demo_summary
from lmscope.workflows.pipeline import Stage, StageOutcome
from lmscope.workflows.steer_search import SteerSearchConfig

EPILOG = """Examples:

  lmscope demo                                  (SmolLM2-135M-Instruct on the stdlib corpus, then serve)

  lmscope demo --quick --no-serve               (a minutes-long smoke run of the same pipeline)

  lmscope demo --model ./my-model --corpus data/*.txt --layer 8 --tokens 500k --run-dir runs/mine

  lmscope demo --dict path/to/saelens_sae --run-dir runs/theirs   (someone else's SAE: no harvest or training)

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
        dict_dir: Annotated[
            Path | None,
            typer.Option(
                "--dict",
                help="Use this dictionary instead of harvesting and training one: an lmscope, SAELens or sparsify "
                "folder, or a Gemma Scope file, for this model (its hook sets the layer).",
            ),
        ] = None,
        dict_hook: Annotated[
            str | None,
            typer.Option("--dict-hook", help="The dictionary's hook, if it names none (any naming lmscope reads)."),
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
        if dict_hook is not None and dict_dir is None:
            raise LmscopeError("--dict-hook names the hook of a --dict dictionary; pass --dict too")
        if dict_dir is not None:
            from lmscope.dictionaries.pretrained import open_dictionary

            open_dictionary(dict_dir, hook=dict_hook)  # fail early, before the model loads
            overrides.update(dictionary=str(dict_dir), dict_hook=dict_hook)
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
            console.rule("searching for a feature to steer")
            summary = demo_summary(job, SteerSearchConfig.quick() if quick else None, progress=bars)
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
        print_steer(s["steer"])
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


def print_steer(st: dict) -> None:
    """The steering search's result (workflows/steer_search.py): the measured rise of the feature's own tokens,
    its interval and fluency cost, both texts of the first sample and the command that reproduces them."""
    search = st["search"]
    k = len(search["trials"])
    cap = " (the time cap stopped the search)" if search.get("stopped_at_time_cap") else ""
    trials = f"{k} trial{'' if k == 1 else 's'}"
    done = f"{search['candidates']} candidates screened, {trials}{cap}, {search['seconds']:.0f} s"
    if "feature" not in st:
        console.print(f"\nSteering: no candidate feature raised its own tokens on the screen ({done}).")
        return
    label = f" ({st['label']})" if st.get("label") else ""
    what = (
        f"clamping feature {st['feature']}{label} to {st['value']:g} ({st['multiple']:g}× its max) "
        f"{'from the end of' if st['from_prompt_end'] else 'throughout'} {st['prompt']!r}, over {st['samples']} "
        f"samples, moved its tokens ({', '.join(map(repr, st['tokens']))}, ...) "
        f"from {st['baseline']:.1%} to {st['steered']:.1%} of the generated tokens ({100 * st['rise']:+.1f} points, "
        f"95% interval {100 * st['rise_low']:+.1f} to {100 * st['rise_high']:+.1f}; up in {st['samples_up']}, down "
        f"in {st['samples_down']}), "
        f"at a fluency cost of perplexity {st['perplexity_baseline']:.1f} → {st['perplexity_steered']:.1f} under the "
        f"unsteered model (KL {st['kl']:.2f} at the first token)"
    )
    what = escape(what)  # labels and texts are data: a '[' in them is not rich markup
    if st["found"]:
        console.print(f"\nTry steering. Measured just now: {what}.  ({done})", highlight=False)
    else:
        console.print(
            f"\nSteering: no feature's clamp raised its own tokens clearly above the sample noise at an acceptable "
            f"fluency cost ({done}). The best measured: {what}.",
            highlight=False,
        )
    console.print(
        escape(f"  baseline: {st['prompt']!r} + {st['baseline_text']!r}\n  steered:  ... + {st['steered_text']!r}"),
        highlight=False,
    )
    console.print(f"  [bold]{escape(st['command'])}[/]", highlight=False)
