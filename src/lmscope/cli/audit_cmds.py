"""`lmscope audit MODEL`: concept probes with controls, inside vs outside, a backdoor scan, one report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from lmscope.cli.common import DeviceOpt, ModelArg, console, handles_errors
from lmscope.cli.progress import RichProgress

COLOURS = {"green": "green", "amber": "yellow", "red": "red", "grey": "bright_black"}


def register(app: typer.Typer) -> None:
    @app.command(
        epilog="Examples:\n\n"
        "  lmscope audit smollm2-135m --out audit/base\n\n"
        "  lmscope audit smollm2-135m --dict runs/sae/blocks.6.resid_post --atlas atlas.db --out audit/base\n\n"
        "  lmscope audit org/backdoor --reference smollm2-135m --corpus prompts.jsonl --out audit/backdoor\n\n"
        "  lmscope audit org/sycophancy --battery truth --battery sycophancy --no-scan --out audit/syco\n\n"
        "  lmscope audit smollm2-135m --battery-file my_pairs.jsonl --out audit/mine   (one pair per line: "
        '{"positive": ..., "negative": ..., "topic": ..., "family": ...})'
    )
    @handles_errors
    def audit(
        model: ModelArg = "smollm2-135m",
        out: Annotated[Path, typer.Option(help="Output directory (report.json, report.html, probes, parts/).")] = Path(
            "audit"
        ),
        battery: Annotated[
            list[str] | None, typer.Option(help="A shipped battery (repeat; default: all of them).")
        ] = None,
        battery_file: Annotated[
            list[Path] | None, typer.Option(help="Your battery: a JSONL of pairs (repeat).")
        ] = None,
        reference: Annotated[
            str | None, typer.Option(help="The model before fine-tuning, for the backdoor scan.")
        ] = None,
        corpus: Annotated[
            str, typer.Option(help="Corpus the backdoor scan reads: stdlib, a path, hf:NAME.")
        ] = "stdlib",
        contexts: Annotated[int, typer.Option(help="Backdoor scan: corpus contexts read.", min=1)] = 256,
        scan: Annotated[bool, typer.Option(help="Run the backdoor scan.")] = True,
        ordinary: Annotated[
            str | None,
            typer.Option(
                help="Backdoor scan with --dict: corpus where 'dead' is read (default: the "
                "atlas's densities, else the scan corpus)."
            ),
        ] = None,
        inside_outside: Annotated[bool, typer.Option(help="Compare stated answers with the truth probe.")] = True,
        seed: Annotated[int, typer.Option(help="Seed of the splits and controls.")] = 0,
        dict_dir: Annotated[
            Path | None,
            typer.Option(
                "--dict",
                help="A dictionary of the residual stream: links each probe to features, "
                "and the backdoor scan tests where features dead on ordinary text fire.",
            ),
        ] = None,
        atlas: Annotated[Path | None, typer.Option(help="The dictionary's atlas: labels, pages, search.")] = None,
        steer: Annotated[bool, typer.Option(help="Steering checks: add each probe direction, measure.")] = True,
        device: DeviceOpt = "auto",
    ) -> None:
        """Scan MODEL for safety-relevant internals; every finding with the evidence behind it."""
        from lmscope.audit import AuditConfig, ScanConfig, run_audit
        from lmscope.audit.batteries import BUILDERS
        from lmscope.model.loading import load_model

        names = list(battery) if battery else ([] if battery_file else list(BUILDERS))
        files = [str(f) for f in battery_file or []]
        sc = ScanConfig(corpus=corpus, contexts=contexts, seed=seed, ordinary=ordinary) if scan else None
        cfg = AuditConfig(batteries=names, battery_files=files, inside_outside=inside_outside, seed=seed, scan=sc)
        from lmscope.audit.report import batteries_of

        batteries_of(cfg)  # bad names or files fail before any model loads
        d = None
        density = None
        if dict_dir is not None:
            from lmscope.dictionaries.pretrained import open_dictionary

            d = open_dictionary(dict_dir)
            if atlas is not None:
                from lmscope.atlas.store import AtlasStore

                density = AtlasStore(atlas).densities()
        m = load_model(model, device=device, dtype="float32")
        ref = load_model(reference, device=device, dtype="float32") if reference else None
        with RichProgress() as bar:
            report = run_audit(m, out, cfg, reference=ref, progress=bar, dictionary=d, atlas_density=density)
        if steer or d is not None:
            from lmscope.workflows.audit_checks import feature_links, steering_checks

            if steer:
                console.print("steering checks ...")
                report = steering_checks(m, out)
            if d is not None:
                console.print("linking probes to dictionary features ...")
                report = feature_links(m, out, d, atlas)
        table = Table(title=f"audit of {report['model']}")
        for col in ("finding", "light", "why"):
            table.add_column(col)
        for light in report["summary"]:
            c = COLOURS.get(light["colour"], "white")
            table.add_row(light["what"], f"[{c}]●[/] {light['light']}", light["why"])
        console.print(table)
        console.print(f"wrote {out / 'report.json'} and {out / 'report.html'}")
