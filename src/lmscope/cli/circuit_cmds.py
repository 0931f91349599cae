"""`lmscope transcoders` (a transcoder at every layer, one streaming pass) and `lmscope circuit` (attribution
graphs: build, score, prune, export for Neuronpedia's viewer, and check by intervention)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from lmscope.cli.common import DeviceOpt, DtypeOpt, ModelArg, console, handles_errors, parse_count
from lmscope.cli.progress import RichProgress
from lmscope.errors import CircuitError
from lmscope.training import distributed as ddp


def register(app: typer.Typer) -> None:
    @app.command(
        epilog="Examples:\n\n"
        "  lmscope transcoders smollm2-135m --corpus stdlib --layers all --tokens 2M --out tc/\n\n"
        "  lmscope transcoders smollm2-135m --corpus docs/ --layers 0-9 --k 16 --expansion 4 --out tc/\n\n"
        "  torchrun --nproc_per_node 2 -m lmscope.cli.app transcoders smollm2-135m --corpus stdlib --out tc/"
    )
    @handles_errors
    def transcoders(
        model: ModelArg,
        out: Annotated[Path, typer.Option(help="Output directory: one transcoder per layer, checkpoint, manifest.")],
        corpus: Annotated[str, typer.Option(help="Corpus: stdlib, a text/JSONL/Parquet path, or hf:NAME.")] = "stdlib",
        layers: Annotated[str, typer.Option(help="all, 3, 0,4,8 or 2-5.")] = "all",
        tokens: Annotated[str, typer.Option(help="Training tokens (each feeds every layer), e.g. 2M.")] = "2M",
        arch: Annotated[str, typer.Option(help="Dictionary architecture (topk, batchtopk, relu, jumprelu).")] = "topk",
        k: Annotated[int, typer.Option(help="Active latents per token (TopK/BatchTopK).")] = 32,
        expansion: Annotated[float, typer.Option(help="Latents per model dimension.")] = 8.0,
        skip: Annotated[bool, typer.Option("--skip", help="Skip-transcoders: add an affine x @ W_skip term.")] = False,
        batch_size: Annotated[int, typer.Option(help="Tokens per step.")] = 4096,
        context: Annotated[int, typer.Option(help="Tokens per context.")] = 128,
        lr: Annotated[float | None, typer.Option(help="Peak LR (default: the architecture's).")] = None,
        warmup_steps: Annotated[int, typer.Option(help="Linear LR warmup steps.")] = 100,
        checkpoint_every: Annotated[int, typer.Option(help="Steps between checkpoints (kill -9 resumes).")] = 50,
        eval_tokens: Annotated[
            str, typer.Option(help="Held-out tokens for FVU and CE with every MLP replaced.")
        ] = "8k",
        seed: Annotated[int, typer.Option(help="Seed of the initialisation.")] = 0,
        no_resume: Annotated[bool, typer.Option(help="Start afresh even if --out holds a checkpoint.")] = False,
        device: DeviceOpt = "auto",
        dtype: DtypeOpt = "auto",
    ) -> None:
        """Train a transcoder (blocks.i.mlp_in -> blocks.i.mlp_out) at every chosen layer from one streaming pass."""
        from lmscope.circuits.train import TranscoderRecipe, parse_layers, train_transcoders
        from lmscope.model.loading import load_model

        dev = ddp.init_from_env(device)
        m = load_model(model, device=str(dev), dtype=dtype)
        recipe = TranscoderRecipe(
            layers=parse_layers(layers, m.n_layers), arch=arch, k=k, expansion=expansion, skip=skip,
            tokens=parse_count(tokens, 1),
            batch_size=batch_size, context=context, lr=lr, warmup_steps=warmup_steps, seed=seed,
            checkpoint_every=checkpoint_every, eval_tokens=parse_count(eval_tokens, 1),
        )  # fmt: skip
        with RichProgress(enabled=ddp.is_main()) as bar:
            info = train_transcoders(m, corpus, out, recipe, progress=bar, device=dev, resume=not no_resume)
        if not ddp.is_main():
            return
        ev = info["eval"]
        held = "held out" if ev.get("held_out") else "NOT held out: the corpus ended, so measured on its start"
        table = Table("layer", f"FVU ({held})", title=f"transcoders in {out}")
        for layer, f in ev["fvu"].items():
            table.add_row(layer, f"{f:.3f}")
        console.print(table)
        console.print(
            f"every MLP replaced at once: CE {ev['ce_spliced']:.3f} (clean {ev['ce_clean']:.3f}, all MLPs zeroed "
            f"{ev['ce_zero']:.3f}) → CE recovered {ev['ce_recovered']:.3f}, KL {ev['kl_spliced']:.3f}",
            highlight=False,
        )

    @app.command(
        epilog="Examples:\n\n"
        '  lmscope circuit smollm2-135m --transcoders tc/ --prompt "The capital of France is" '
        "--out graphs/france.json\n\n"
        '  lmscope circuit smollm2-135m --transcoders tc/ --prompt "..." --target " Paris" --out g.json\n\n'
        '  lmscope circuit smollm2-135m --transcoders tc/ --prompt "..." --target " Paris" --minus " London" '
        "--out g.json\n\n"
        "  lmscope circuit smollm2-135m --transcoders tc/ --graph g.safetensors --intervene 5:1207:6=0\n\n"
        "  torchrun --standalone --nproc_per_node 2 -m lmscope.cli.app circuit smollm2-135m --transcoders tc/ "
        '--prompt "..." --out g.json   (each rank computes every other batch of rows; the same graph)'
    )
    @handles_errors
    def circuit(
        model: ModelArg,
        transcoders: Annotated[Path, typer.Option(help="A transcoder set made by `lmscope transcoders`.")],
        out: Annotated[
            Path | None,
            typer.Option(
                help="Graph JSON for Neuronpedia's viewer / `lmscope serve --graphs`; "
                "the full graph goes beside it as .safetensors."
            ),
        ] = None,
        prompt: Annotated[str | None, typer.Option(help="The prompt to attribute.")] = None,
        graph: Annotated[Path | None, typer.Option(help="A saved full graph (.safetensors) to reuse.")] = None,
        target: Annotated[
            list[str] | None, typer.Option(help="Target token(s), each a single token; repeatable.")
        ] = None,
        minus: Annotated[
            str | None, typer.Option(help="With one --target: attribute logit(target) - logit(minus).")
        ] = None,
        max_feature_nodes: Annotated[int, typer.Option(help="Feature rows computed (most influential first).")] = 4096,
        max_edges_per_row: Annotated[
            int, typer.Option(help="Edges kept per row (0: all; what is dropped is recorded).")
        ] = 16384,
        node_threshold: Annotated[float, typer.Option(help="Pruning: cumulative node influence kept.")] = 0.8,
        edge_threshold: Annotated[float, typer.Option(help="Pruning: cumulative edge influence kept.")] = 0.98,
        max_tokens: Annotated[int, typer.Option(help="Longest prompt accepted, in tokens.")] = 4096,
        batch_size: Annotated[int, typer.Option(help="Rows per backward pass (0: by memory).")] = 0,
        intervene: Annotated[list[str] | None, typer.Option(help="LAYER:FEATURE:POS=VALUE; repeatable.")] = None,
        slug: Annotated[
            str | None, typer.Option(help="The graph's name in the viewer (default: --out's stem).")
        ] = None,
        atlas: Annotated[
            Path | None, typer.Option(help="Per-layer atlases (`lmscope atlas --dict TC/`) to label nodes.")
        ] = None,
        device: DeviceOpt = "auto",
        dtype: DtypeOpt = "auto",
    ) -> None:
        """Build (or load) an attribution graph, print its scores, write it, and check interventions against it."""
        from lmscope.circuits import AttributionConfig, Graph, TranscoderSet, attribute, prune, scores
        from lmscope.circuits.attribute import dense_bytes
        from lmscope.circuits.export import atlas_labeler, to_neuronpedia, write_neuronpedia
        from lmscope.circuits.intervene import check_interventions, parse_intervention
        from lmscope.model.loading import load_model

        if (prompt is None) == (graph is None):
            raise CircuitError("give exactly one of --prompt (build a graph) or --graph (reuse a saved one)")
        ivs = [parse_intervention(t) for t in intervene or []]
        dev = ddp.init_from_env(device)  # under torchrun every rank computes every N-th batch of rows
        m = load_model(model, device=str(dev) if ddp.world_size() > 1 else device, dtype=dtype)
        tcs = TranscoderSet.load(transcoders, device=str(m.device))
        tcs.check(m)
        if graph is not None:
            g = Graph.load(graph)
        else:
            cfg = AttributionConfig(
                max_feature_nodes=max_feature_nodes or None, max_edges_per_row=max_edges_per_row or None,
                batch_size=batch_size or None, max_prompt_tokens=max_tokens,
            )  # fmt: skip
            with RichProgress(enabled=ddp.is_main()) as bar:
                g = attribute(m, tcs, prompt or "", cfg, targets=target or (), minus=minus, progress=bar)
        if not ddp.is_main():
            return  # rank 0 holds the same graph and reports and writes it
        pr = prune(g, node_threshold, edge_threshold)
        full, kept = scores(g), scores(g, pr.edges)
        console.print(f"prompt: {g.prompt!r} ({g.n_pos} tokens)", highlight=False)
        for t in g.targets:
            console.print(f"  target {t['label']}  p={t['probability']:.3f}  value={t['value']:.3f}", highlight=False)
        table = Table("graph", "nodes", "edges", "replacement", "completeness")
        table.add_row(
            "unpruned",
            str(g.n_nodes),
            str(g.adjacency.nnz),
            f"{full['replacement']:.3f}",
            f"{full['completeness']:.3f}",
        )
        table.add_row("pruned", str(int(pr.node_mask.sum())), str(pr.edges.nnz), f"{kept['replacement']:.3f}",
                      f"{kept['completeness']:.3f}")  # fmt: skip
        console.print(table)
        if graph is None:
            dropped = g.meta.get("dropped", {})
            console.print(
                f"{g.meta['n_visited_features']} of {g.meta['n_active_features']} active features visited in "
                f"{g.meta['seconds']:.1f} s; rows capped {dropped.get('rows_capped', 0)} of {dropped.get('rows', 0)} "
                f"(max |weight| dropped {dropped.get('max_abs_frac', 0):.2%}); kept edges take "
                f"{g.adjacency.nnz * 12 / 1e6:.1f} MB, a dense float32 matrix would take "
                f"{dense_bytes(g) / 1e6:,.1f} MB",
                highlight=False,
            )
        if out is not None:
            name = slug or re.sub(r"[^A-Za-z0-9_.-]", "-", out.stem)[:100]
            out.parent.mkdir(parents=True, exist_ok=True)
            if graph is None:
                g.save(out.with_suffix(".safetensors"))
            labeler = atlas_labeler(atlas) if atlas is not None else None
            write_neuronpedia(to_neuronpedia(g, name, node_threshold, edge_threshold, labeler=labeler), out)
            console.print(f"wrote {out} (viewer JSON) and {out.with_suffix('.safetensors')} (full graph)")
        if ivs:
            report = check_interventions(m, tcs, g, ivs)
            t2 = Table("target", "graph predicts", "constrained", "attention frozen", "free", title="interventions")
            for r in report["targets"]:
                t2.add_row(r["label"], f"{r['predicted']:+.4f}", f"{r['constrained']:+.4f}",
                           f"{r['frozen_attention']:+.4f}", f"{r['free']:+.4f}")  # fmt: skip
            console.print(t2)
            t3 = Table("feature node", "graph predicts", "constrained", "attention frozen", title="downstream features")
            for r in report["features"]:
                t3.add_row(f"L{r['layer']}/#{r['feature']}@{r['pos']}", f"{r['predicted']:+.4f}",
                           f"{r['constrained']:+.4f}", f"{r['frozen_attention']:+.4f}")  # fmt: skip
            console.print(t3)
            tops = ", ".join(f"{t['token']!r} {t['p_before']:.3f}→{t['p']:.3f}" for t in report["free_top_tokens"])
            console.print(f"free run, top next tokens: {tops}", highlight=False)
            if out is not None:
                out.with_suffix(".interventions.json").write_text(json.dumps(report, indent=2))
