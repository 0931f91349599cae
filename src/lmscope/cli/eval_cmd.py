"""`lmscope eval`: reconstruction and spliced-loss metrics of a dictionary on a corpus."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from lmscope.cli.common import DeviceOpt, DtypeOpt, ModelArg, console, handles_errors, parse_count
from lmscope.dictionaries.pretrained import open_dictionary
from lmscope.model.loading import load_model
from lmscope.training.evaluate import eval_contexts, evaluate, save_json
from lmscope.training.health import check_eval

EPILOG = """Examples:

  lmscope eval smollm2-135m --dict runs/demo/dict --corpus stdlib --tokens 8192 --skip-tokens 300000

  lmscope eval ./my-model --dict saes/l6 --corpus data/*.txt --tokens 16k --json eval.json

Held-out data: the stdlib corpus is read in a fixed order, so skip the tokens a dictionary was trained on
(--skip-tokens, the harvest's token count) to evaluate on text it has not seen."""


def results_table(results: dict[str, Any], title: str = "dictionary evaluation") -> Table:
    table = Table("metric", "value", title=title)
    for key, value in results.items():
        if key == "density_hist":
            edges = value["log10_bin_edges"]
            bins = ", ".join(
                f"1e{lo}..1e{hi}: {c}" for lo, hi, c in zip(edges, edges[1:], value["counts"], strict=False)
            )
            table.add_row("density histogram", f"{bins}; dead: {value['dead']}")
        elif isinstance(value, float):
            table.add_row(key, f"{value:.4f}")
        else:
            table.add_row(key, str(value))
    return table


def register(app: typer.Typer) -> None:
    @app.command("eval", epilog=EPILOG)
    @handles_errors
    def eval_(
        model: ModelArg,
        dict_dir: Annotated[
            Path, typer.Option("--dict", help="A dictionary: lmscope, SAELens or sparsify folder, or Gemma Scope file.")
        ],
        dict_hook: Annotated[
            str | None, typer.Option("--dict-hook", help="Its hook, if the file names none (any naming lmscope reads).")
        ] = None,
        corpus: Annotated[
            str, typer.Option(help="Corpus spec: stdlib, files/globs, .jsonl, .parquet, hf:NAME.")
        ] = "stdlib",
        tokens: Annotated[str, typer.Option(help="Tokens to evaluate on (e.g. 8192, 16k).")] = "8192",
        skip_tokens: Annotated[str, typer.Option(help="Tokens of the corpus to skip first (held-out data).")] = "0",
        context: Annotated[int, typer.Option(min=2)] = 128,
        batch: Annotated[int, typer.Option(min=1, help="Contexts per forward pass.")] = 8,
        json_out: Annotated[
            Path | None, typer.Option("--json", help="Where to write JSON (default DICT/eval.json).")
        ] = None,
        device: DeviceOpt = "auto",
        dtype: DtypeOpt = "auto",
    ) -> None:
        """Evaluate a dictionary: FVU, MSE, L0, dead fraction, density histogram, cosine, relative bias, and
        CE-loss recovered and KL with the dictionary spliced in (with and without the error term)."""
        lm = load_model(model, device=device, dtype=dtype)
        d = open_dictionary(dict_dir, device=lm.device, hook=dict_hook)
        ids, special = eval_contexts(lm, corpus, parse_count(tokens), context, parse_count(skip_tokens))
        results = evaluate(d, lm, ids, batch=batch, special=special)
        results.update(
            {"model": model, "corpus": corpus, "tokens": int(ids.numel()), "skip_tokens": parse_count(skip_tokens)}
        )
        console.print(results_table(results, title=f"{dict_dir} on {ids.numel()} tokens of {corpus}"))
        results["warnings"] = [str(w) for w in check_eval(results, d.cfg)]  # FVU > 1, L0 far off its target, dead
        for warning in results["warnings"]:
            console.print(f"warning: {warning}", style="yellow", markup=False, highlight=False)
        console.print("health: " + ("ok" if not results["warnings"] else f"{len(results['warnings'])} warning(s)"))
        out = json_out or Path(dict_dir) / "eval.json"
        save_json(results, out)
        console.print(f"wrote {out}")
