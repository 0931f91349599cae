"""`lmscope harvest` and `lmscope verify`: write activations to a resumable on-disk store, and recheck it."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from lmscope.cli.common import (
    DeviceOpt,
    DtypeOpt,
    ModelArg,
    TrustOpt,
    console,
    err_console,
    handles_errors,
    parse_count,
)
from lmscope.cli.progress import RichProgress
from lmscope.corpora import PackingConfig, open_corpus

HARVEST_EPILOG = (
    "Examples:\n\n"
    "  lmscope harvest smollm2-135m --corpus stdlib --hooks blocks.6.resid_post --tokens 2M --out acts/\n\n"
    "  lmscope harvest smollm2-135m --corpus data.jsonl --field text --hooks blocks.3.resid_post,blocks.6.mlp_out "
    "--tokens 500k --context 256 --store-dtype bf16 --out acts2/\n\n"
    "  lmscope harvest ./my-model --corpus 'docs/**/*.md' --hooks blocks.0.resid_post --tokens 64k --out acts3/\n\n"
    "  torchrun --standalone --nproc_per_node 4 -m lmscope.cli.app harvest smollm2-135m --hooks blocks.6.resid_post "
    "--tokens 100M --out acts/   (shard j on rank j mod 4; the same store as one process)\n\n"
    "Rerunning the same command after an interruption (even kill -9) resumes after the last complete shard."
)


def register(app: typer.Typer) -> None:
    @app.command(epilog=HARVEST_EPILOG)
    @handles_errors
    def harvest(
        model: ModelArg = "smollm2-135m",
        corpus: Annotated[
            str,
            typer.Option(
                help="stdlib (built in), a text file/dir/glob, a .jsonl or .parquet file/dir/glob, or hf:NAME[:CONFIG]."
            ),
        ] = "stdlib",
        hooks: Annotated[str, typer.Option(help="Comma-separated hook names (see `lmscope info MODEL`).")] = (
            "blocks.6.resid_post"
        ),
        tokens: Annotated[str, typer.Option(help="How many tokens to harvest: 2M, 500k, 65536 ...")] = "2M",
        context: Annotated[int, typer.Option(help="Tokens per context.", min=2)] = 128,
        out: Annotated[Path, typer.Option(help="Output directory (created; reused to resume).")] = Path("acts"),
        store_dtype: Annotated[str, typer.Option(help="Stored activation dtype: float16, bfloat16, float32.")] = (
            "float16"
        ),
        field: Annotated[str, typer.Option(help="JSONL field / Parquet column / dataset field holding text.")] = "text",
        split: Annotated[str, typer.Option(help="Dataset split for hf: corpora.")] = "train",
        packing: Annotated[str, typer.Option(help="pack (documents joined by a separator) or truncate.")] = "pack",
        bos: Annotated[str, typer.Option(help="Where BOS goes: context (each context), document, none.")] = "context",
        batch_size: Annotated[int, typer.Option(help="Contexts per forward pass.", min=1)] = 32,
        shard_tokens: Annotated[str, typer.Option(help="Tokens per shard file.")] = "65536",
        overwrite: Annotated[bool, typer.Option(help="Delete an existing harvest in --out and start again.")] = False,
        progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
        device: DeviceOpt = "auto",
        dtype: DtypeOpt = "auto",
        trust_remote_code: TrustOpt = False,
    ) -> None:
        """Run MODEL over a corpus and store activations at the given hooks as safetensors shards."""
        from lmscope.activations import HarvestConfig
        from lmscope.activations import harvest as run_harvest
        from lmscope.core.distributed import init_from_env, is_main, world_size
        from lmscope.model.loading import load_model

        dev = init_from_env(device)  # under torchrun: shard j goes to rank j mod N (docs/harvest.md)
        if world_size() > 1:
            device = str(dev)
            progress = progress and is_main()
        hook_list = [h.strip() for h in hooks.split(",") if h.strip()]
        pack = PackingConfig.from_dict({"mode": packing, "bos": bos})  # HarvestConfig sets its context
        cfg = HarvestConfig(
            hooks=hook_list, tokens=parse_count(tokens, minimum=1), context=context, dtype=store_dtype,
            batch_size=batch_size, shard_tokens=parse_count(shard_tokens, minimum=1), packing=pack,
        )  # fmt: skip
        src = open_corpus(corpus, field=field, split=split)
        m = load_model(model, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
        command = shlex.join(["lmscope", *sys.argv[1:]])
        with RichProgress(enabled=progress, console=err_console) as bar:  # log lines print above the bar
            manifest = run_harvest(
                m, src, out, cfg, command=command, progress=bar, overwrite=overwrite,
                log=lambda msg: err_console.print(msg, highlight=False),
            )  # fmt: skip
        if is_main():
            _summary(manifest, out)

    @app.command(epilog="Examples:\n\n  lmscope verify acts/\n\nExits with status 1 if any shard is bad.")
    @handles_errors
    def verify(directory: Annotated[Path, typer.Argument(help="A harvest output directory.")]) -> None:
        """Recheck every shard of a harvest against the sizes and sha256 checksums in its manifest."""
        from lmscope.activations import verify as run_verify

        report = run_verify(directory)
        for note in report.notes:
            console.print(f"[yellow]note:[/] {note}", highlight=False)
        if report.ok:
            console.print(f"[green]ok[/]: {report.checked} shard(s) in {directory} match their checksums")
            return
        for problem in report.problems:
            err_console.print(f"[bold red]bad shard:[/] {problem}", highlight=False)
        err_console.print(
            f"{len(report.problems)} of {report.checked} shard(s) are bad. Delete them and rerun the harvest "
            "command (in manifest.json) to recompute them",
            highlight=False,
        )
        raise typer.Exit(1)


def _summary(manifest: dict[str, Any], out: Path) -> None:
    shards = manifest["shards"]
    size = sum(s["bytes"] for s in shards)
    console.print(
        f"[green]done[/]: {manifest['tokens']:,} tokens in {len(shards)} shard(s), {size / 1e6:.1f} MB, in {out}",
        highlight=False,
    )
    stats = manifest["corpus"].get("stats", {})
    if stats.get("replaced_bytes"):
        console.print(
            f"[yellow]note:[/] {stats['replaced_bytes']:,} undecodable byte(s) in "
            f"{stats.get('files_with_replacements', '?')} file(s) were replaced by U+FFFD",
            highlight=False,
        )
    if stats.get("skipped_binary_files"):
        console.print(f"[yellow]note:[/] skipped {stats['skipped_binary_files']} binary file(s)", highlight=False)
    if manifest["corpus"].get("exhausted"):
        console.print(
            f"[yellow]note:[/] the corpus ran out at {manifest['tokens']:,} of {manifest['target_tokens']:,} tokens",
            highlight=False,
        )
    for hook, norm in manifest.get("mean_norms", {}).items():
        console.print(f"mean norm {hook}: {norm:.3f}", highlight=False)
