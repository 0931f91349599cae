"""`lmscope atlas` and `lmscope serve`: build a feature atlas, and browse it in a local web explorer."""

from __future__ import annotations

import contextlib
import shlex
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer

from lmscope.cli.common import DeviceOpt, DtypeOpt, ModelArg, TrustOpt, console, err_console, handles_errors
from lmscope.errors import LmscopeError

ATLAS_EPILOG = (
    "Examples:\n\n"
    "  lmscope atlas smollm2-135m --dict runs/sae/blocks.6.resid_post --corpus stdlib --tokens 1M --out atlas.db\n\n"
    "  lmscope atlas ./my-model --dict sae/ --corpus data.jsonl --field text --tokens 200k --context 256 "
    "--top-k 20 --out my.db\n\n"
    "  lmscope atlas smollm2-135m --dict tc/ --layers 0-5 --corpus stdlib --tokens 200k --out tc-atlas/   "
    "(a transcoder set: one atlas per layer, OUT/layerNN.db)\n\n"
    "  torchrun --standalone --nproc_per_node 4 -m lmscope.cli.app atlas smollm2-135m --dict sae/ --tokens 10M "
    "--out atlas.db   (4 processes, one file, the same as one process)\n\n"
    "  lmscope atlas smollm2-135m --other org/backdoor --dict diff/bd/crosscoder/batchtopk --corpus prompts.jsonl "
    "--tokens 65536 --context 64 --out bd-crosscoder.db   (a crosscoder over BASE and OTHER)\n\n"
    "An interrupted build leaves only OUT.partial; rerunning the command starts it again. "
    "Use --overwrite to replace an existing atlas."
)
EXPORT_EPILOG = (
    "Examples:\n\n"
    "  lmscope export atlas.db --static site/              (open site/index.html, or host the folder)\n\n"
    "  lmscope export big.db --static site/ --limit 20000  (the first 20,000 features of a large atlas)\n\n"
    "  lmscope export tc-atlas/layer03.db --static site3/  (a transcoder layer: features/MODEL-blocks.3.mlp_in/ID.json "
    "for lmscope's graphs in circuit-tracer's viewer)"
)
FAMILIES_EPILOG = (
    "Examples:\n\n"
    "  lmscope families atlas.db                          (the dictionary the atlas records; default levels)\n\n"
    "  lmscope families atlas.db --dict sae/ --levels 16,64,256 --cofire-weight 0.3\n\n"
    "An atlas built by this lmscope has them already (browse them at /map of `lmscope serve`); this command adds them "
    "to an older atlas or recomputes them with other settings."
)
SERVE_EPILOG = (
    "Examples:\n\n"
    "  lmscope serve atlas.db                       (http://127.0.0.1:8000, inspector uses the atlas's model)\n\n"
    "  lmscope serve atlas.db --port 8080 --no-live  (no model: the prompt inspector is switched off)\n\n"
    "  lmscope serve atlas.db --read-only            (no human-label editing from the feature pages)\n\n"
    "  lmscope serve atlas.db --graphs graphs/       (graphs written by `lmscope circuit --out graphs/X.json`)\n\n"
    "  lmscope serve atlas.db --diffs diffs/         (model-diff reports written by `lmscope diff --out diffs/X`)\n\n"
    "  lmscope serve atlas.db --audits audits/       (audit reports written by `lmscope audit --out audits/X`)\n\n"
    "  lmscope serve atlas.db --match match.json     (each feature's partners from `lmscope match DICT OTHER`)\n\n"
    "  lmscope serve atlas.db --host 0.0.0.0         (reachable from other machines: only on trusted networks)"
)


def register(app: typer.Typer) -> None:
    @app.command(epilog=ATLAS_EPILOG)
    @handles_errors
    def atlas(
        model: ModelArg = "smollm2-135m",
        dict_dir: Annotated[
            Path, typer.Option("--dict", help="A dictionary: lmscope, SAELens or sparsify folder, or Gemma Scope file.")
        ] = Path("dict"),
        corpus: Annotated[
            str, typer.Option(help="stdlib (built in), a text file/dir/glob, .jsonl/.parquet, or hf:NAME[:CONFIG].")
        ] = "stdlib",
        tokens: Annotated[str, typer.Option(help="Tokens to scan: 1M, 200k, 65536 ...")] = "1M",
        out: Annotated[Path, typer.Option(help="The atlas file to write (SQLite).")] = Path("atlas.db"),
        hook: Annotated[str | None, typer.Option(help="Hook to read (default: the dictionary's own).")] = None,
        context: Annotated[int, typer.Option(help="Tokens per context.", min=2)] = 128,
        batch_size: Annotated[int, typer.Option(help="Contexts per forward pass.", min=1)] = 8,
        top_k: Annotated[int, typer.Option(help="Top-activating examples kept per feature.", min=1)] = 16,
        samples_per_bin: Annotated[int, typer.Option(help="Examples per activation-quantile bin.", min=1)] = 4,
        field: Annotated[str, typer.Option(help="JSONL field / Parquet column / dataset field holding text.")] = "text",
        split: Annotated[str, typer.Option(help="Dataset split for hf: corpora.")] = "train",
        overwrite: Annotated[bool, typer.Option(help="Replace an existing atlas at --out.")] = False,
        layers: Annotated[str, typer.Option(help="With a transcoder set as --dict: all, 3, 0,4,8 or 2-5.")] = "all",
        progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
        other: Annotated[
            str | None, typer.Option(help="A crosscoder's second model (OTHER); MODEL is then BASE.")
        ] = None,
        activations: Annotated[
            Path | None,
            typer.Option(
                help="A harvest (lmscope harvest --out DIR) of MODEL over this corpus at the dictionary's hook: the "
                "atlas reads its activations instead of running the model (several times faster; float16 harvests "
                "round them)."
            ),
        ] = None,
        device: DeviceOpt = "auto",
        dtype: DtypeOpt = "auto",
        trust_remote_code: TrustOpt = False,
    ) -> None:
        """Scan a corpus with MODEL and a dictionary, and write every feature's dossier to one SQLite file."""
        from lmscope.atlas import AtlasConfig, build_atlas, open_atlas
        from lmscope.atlas.db.schema import get_meta
        from lmscope.cli.common import parse_count
        from lmscope.cli.progress import RichProgress
        from lmscope.core.distributed import init_from_env, is_main, world_size
        from lmscope.corpora import open_corpus
        from lmscope.dictionaries.pretrained import open_dictionary
        from lmscope.model.loading import load_model

        dev = init_from_env(device)  # under torchrun: join the group; each rank its device (cuda:LOCAL_RANK)
        if world_size() > 1:
            device = str(dev)
            progress = progress and is_main()
        cfg = AtlasConfig(
            tokens=parse_count(tokens), context=context, batch_size=batch_size, top_k=top_k,
            samples_per_bin=samples_per_bin,
        )  # fmt: skip
        from lmscope.circuits.transcoders import is_transcoder_set

        if is_transcoder_set(dict_dir):
            _atlas_per_layer(
                model, dict_dir, corpus, out, cfg, layers, field, split, overwrite, progress, device, dtype
            )
            return
        if out.exists() and not overwrite:
            raise LmscopeError(f"{out} already exists; pass --overwrite or choose another --out")
        open_dictionary(dict_dir, hook=hook)  # fail early, before the model loads (any format lmscope reads)
        src = open_corpus(corpus, field=field, split=split)
        m = load_model(model, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
        o = load_model(other, device=device, dtype=dtype, trust_remote_code=trust_remote_code) if other else None
        with RichProgress(enabled=progress, console=err_console) as bar:  # the log prints above the bar
            path = build_atlas(
                m, dict_dir, src, out=out, config=cfg, hook=hook, overwrite=overwrite, progress=bar,
                command=shlex.join(["lmscope", *sys.argv[1:]]),
                log=lambda msg: err_console.print(msg, highlight=False), other=o, activations=activations,
            )  # fmt: skip
        if not is_main():
            return  # rank 0 wrote the file and reports it
        conn = open_atlas(path, readonly=False)  # a read-write connection leaves no -wal/-shm files behind
        summary, metrics = get_meta(conn, "summary"), get_meta(conn, "metrics")["atlas"]
        conn.close()
        console.print(
            f"[green]done[/]: {summary['d_sae']:,} features over {summary['tokens']:,} tokens in {path} "
            f"({path.stat().st_size / 1e6:.1f} MB); dead {summary['dead']:,}, L0 {metrics['l0']:.1f}, "
            f"FVU {metrics['fvu']:.3f}",
            highlight=False,
        )
        console.print(f"browse it with: lmscope serve {path}", highlight=False)

    @app.command(epilog=SERVE_EPILOG)
    @handles_errors
    def serve(
        atlas: Annotated[Path, typer.Argument(help="An atlas file made by `lmscope atlas`.")],
        host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
        port: Annotated[int, typer.Option(help="TCP port.", min=1, max=65535)] = 8000,
        live: Annotated[
            bool, typer.Option(help="Load the atlas's model and dictionary for the prompt inspector.")
        ] = True,
        model: Annotated[
            str | None, typer.Option("--model", help="Model for the inspector (default: the atlas's).")
        ] = None,
        dict_dir: Annotated[
            Path | None, typer.Option("--dict", help="Dictionary for the inspector (default: the atlas's).")
        ] = None,
        device: DeviceOpt = "auto",
        dtype: DtypeOpt = "auto",
        read_only: Annotated[
            bool, typer.Option("--read-only", help="Turn off human-label editing (the write routes answer 403).")
        ] = False,
        graphs: Annotated[
            Path | None, typer.Option(help="A directory of attribution-graph JSON files (`lmscope circuit --out`).")
        ] = None,
        diffs: Annotated[
            Path | None,
            typer.Option(help="A directory of model-diff reports, one subdirectory each (`lmscope diff --out`)."),
        ] = None,
        audits: Annotated[
            Path | None,
            typer.Option(help="A directory of audit reports, one subdirectory each (`lmscope audit --out`)."),
        ] = None,
        match: Annotated[
            Path | None,
            typer.Option(help="A match report (`lmscope match THIS_DICT OTHER --out`): each feature's partners."),
        ] = None,
        partner_url: Annotated[
            str | None,
            typer.Option(help="Address of an explorer serving the other dictionary's atlas (links the partners)."),
        ] = None,
    ) -> None:
        """Serve the atlas explorer (pages and a JSON API under /api) on HOST:PORT."""
        import uvicorn

        from lmscope.web.app import create_app, load_live

        live_pair = None
        note = "the prompt inspector is off (--no-live)"
        if live:
            live_pair, note = load_live(atlas, model, dict_dir, device=device, dtype=dtype)
        app_ = create_app(atlas, live=live_pair, live_note=note, read_only=read_only, graphs=graphs,
                          diffs=diffs, audits=audits, match=match, partner_url=partner_url)  # fmt: skip
        edits = "label editing off (--read-only)" if read_only else "human labels editable"
        console.print(f"serving {atlas} at http://{host}:{port}  ({note}; {edits})", highlight=False)
        with _sigterm_stops_cleanly():
            uvicorn.run(app_, host=host, port=port, log_level="warning")  # Ctrl-C: shuts down, returns
        console.print("stopped", highlight=False)

    @app.command(epilog=EXPORT_EPILOG)
    @handles_errors
    def export(
        atlas: Annotated[Path, typer.Argument(help="An atlas file made by `lmscope atlas`.")],
        static: Annotated[
            Path, typer.Option("--static", help="Folder to write the static site into (new or empty).")
        ],
        limit: Annotated[
            int | None, typer.Option(help="Export only the first N features (a large atlas's in-browser search).")
        ] = None,
        scan: Annotated[
            str | None,
            typer.Option(
                help="Folder name of the attribution-graph viewer's feature JSON, features/SCAN/ID.json "
                "(default: MODEL-HOOK from the atlas, the name lmscope's graphs look for)."
            ),
        ] = None,
        progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    ) -> None:
        """Write ATLAS as a static site: the same pages, read-only, searchable in the browser, no server; and each
        feature as circuit-tracer's attribution-graph viewer reads it."""
        from lmscope.cli.progress import RichProgress
        from lmscope.web.static_site import export_static

        if not atlas.is_file():
            raise LmscopeError(f"no atlas at {atlas}; build one with `lmscope atlas MODEL --dict DIR --out {atlas}`")
        with RichProgress(enabled=progress, console=err_console) as bar:
            r = export_static(atlas, static, limit=limit, progress=bar, scan=scan)
        index = Path(r["out"]) / "index.html"
        console.print(f"wrote {r['features']:,} of {r['total']:,} features to {r['out']}; open {index} in a browser, "
                      "or host the folder anywhere", highlight=False)  # fmt: skip
        console.print(f"graph-viewer feature JSON: {r['out']}/features/{r['scan']}/ID.json", highlight=False)

    @app.command(epilog=FAMILIES_EPILOG)
    @handles_errors
    def families(
        atlas: Annotated[Path, typer.Argument(help="An atlas file made by `lmscope atlas`.")],
        dict_dir: Annotated[
            Path | None, typer.Option("--dict", help="The atlas's dictionary (default: where the atlas records it).")
        ] = None,
        cofire_weight: Annotated[
            float, typer.Option(help="Weight of co-firing in the distance: 0 decoder cosine only, 1 co-firing only.")
        ] = 0.5,
        levels: Annotated[
            str | None,
            typer.Option(help="Families per level, coarsest first, e.g. 16,64,256 (default: about n/256,n/64,n/16)."),
        ] = None,
        seed: Annotated[int, typer.Option(help="Seed of the map's layout (t-SNE) and of the shuffled baselines.")] = 0,
        max_features: Annotated[
            int, typer.Option(help="Refuse atlases with more live features (memory: about 10 bytes per pair).")
        ] = 16_384,
    ) -> None:
        """Group ATLAS's live features into families (decoder cosine and co-firing, a hierarchy) and lay them out on a
        2-D map, stored in the atlas (replacing any); a failed run leaves the atlas as it was."""
        from lmscope.atlas.families import FamilyConfig, FamilyError, add_families

        lv = None
        if levels is not None:
            try:
                lv = tuple(int(x) for x in levels.split(",") if x.strip())
            except ValueError:
                raise FamilyError(f"--levels {levels!r}: write numbers of families separated by commas, coarsest "
                                  "first, e.g. 16,64,256") from None  # fmt: skip
        cfg = FamilyConfig(cofire_weight=cofire_weight, levels=lv, seed=seed, max_features=max_features)
        meta = add_families(atlas, dict_dir, cfg, log=lambda msg: err_console.print(msg, highlight=False))
        console.print(f"[green]done[/]: {meta['live']:,} live features ({meta['dead_excluded']:,} dead left out) in "
                      f"{meta['seconds']['total']:.1f} s", highlight=False)  # fmt: skip
        for q in meta["quality"]:
            console.print(
                f"  level {q['level']}: {q['families']:,} families (largest {q['largest']:,}); within a family: "
                f"decoder cosine {q['cos_within']:.4f} (shuffled {q['cos_within_shuffled']:.4f}), co-firing "
                f"{q['cofire_within']:.4f} ({q['cofire_within_shuffled']:.4f}); labelled by a shared term "
                f"{q['labelled']:.0%} ({q['labelled_shuffled']:.0%})",
                highlight=False,
            )
        console.print(f"browse the map with: lmscope serve {atlas}  (then /map)", highlight=False)


class _Stopped(Exception):
    """SIGTERM arrived: `lmscope serve` ends like after Ctrl-C (graceful shutdown, exit status 0)."""


@contextlib.contextmanager
def _sigterm_stops_cleanly() -> Iterator[None]:
    """While the server runs, SIGTERM (a process manager, `kill`) stops it like Ctrl-C. uvicorn catches the signal,
    shuts down, then re-raises it to the previous handler; without this one the process would die of it (status
    -15) after the shutdown, indistinguishable from a crash. Only the main thread can set signal handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: object) -> None:
        raise _Stopped

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    except _Stopped:  # uvicorn shut down gracefully, then re-raised the signal to `stop`
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)


def _atlas_per_layer(
    model: str, dict_dir: Path, corpus: str, out: Path, cfg: object, layers: str, field: str, split: str,
    overwrite: bool, progress: bool, device: str, dtype: str,
) -> None:  # fmt: skip
    """`lmscope atlas` over a transcoder set: one atlas per chosen layer, OUT/layerNN.db (existing ones are kept
    unless --overwrite, so a stopped run resumes layer by layer)."""
    from lmscope.atlas import build_atlas
    from lmscope.circuits.train import parse_layers
    from lmscope.circuits.transcoders import TranscoderSet, atlas_name
    from lmscope.cli.progress import RichProgress
    from lmscope.corpora import open_corpus
    from lmscope.model.loading import load_model

    tcs = TranscoderSet.load(dict_dir)
    m = load_model(model, device=device, dtype=dtype)
    tcs.check(m, require_all=False)
    chosen = [i for i in parse_layers(layers, m.n_layers) if i in tcs.layers]
    out.mkdir(parents=True, exist_ok=True)
    for i in chosen:
        path = out / atlas_name(i)
        if path.exists() and not overwrite:
            console.print(f"{path} exists; kept (pass --overwrite to rebuild)", highlight=False)
            continue
        src = open_corpus(corpus, field=field, split=split)
        with RichProgress(enabled=progress, console=err_console) as bar:
            build_atlas(m, tcs.path_of(i), src, out=path, config=cfg, overwrite=overwrite, progress=bar,  # type: ignore[arg-type]
                        command=shlex.join(["lmscope", *sys.argv[1:]]))  # fmt: skip
        console.print(f"[green]done[/]: layer {i} -> {path}", highlight=False)
    console.print(f"label them with `lmscope explain OUT/layerNN.db`, and name graph nodes with "
                  f"`lmscope circuit ... --atlas {out}`", highlight=False)  # fmt: skip
