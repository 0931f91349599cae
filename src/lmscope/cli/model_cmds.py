"""`lmscope info` and `lmscope predict`: look at a model's hook points and next-token predictions."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from lmscope.cli.common import DeviceOpt, DtypeOpt, ModelArg, TrustOpt, console, handles_errors
from lmscope.model.adapter import Model
from lmscope.model.inspect import hook_shapes, predict_next
from lmscope.model.loading import load_model


def print_info(model: Model) -> None:
    cfg = model.config
    console.print(f"[bold]{model.spec}[/]  {type(model.hf).__name__} (family: {model.family.name})")
    console.print(
        f"layers {model.n_layers} · d_model {model.d_model} · d_mlp {model.d_mlp} · vocab {model.vocab_size}"
        f" · heads {getattr(cfg, 'num_attention_heads', '?')} · device {model.device} · dtype {model.dtype}"
    )
    for note in model.notes():
        console.print(f"[yellow]note:[/] {note}", highlight=False)
    table = Table("hook", "module", "side", "shape (batch 1, 4 tokens)", title="hook points")
    for name, shape in hook_shapes(model).items():
        p = model.hook_points[name]
        table.add_row(name, p.module, p.io, str(list(shape)))
    console.print(table)


def print_predictions(text: str, preds: list[tuple[str, float]]) -> None:
    table = Table("rank", "token", "probability", title=f"next token after {text!r}")
    for rank, (tok, p) in enumerate(preds, 1):
        table.add_row(str(rank), repr(tok), f"{p:.4f}")
    console.print(table)


def register(app: typer.Typer) -> None:
    @app.command(epilog="Examples:\n\n  lmscope info smollm2-135m\n\n  lmscope info ./my-hf-model --dtype bfloat16")
    @handles_errors
    def info(
        model: ModelArg = "smollm2-135m",
        device: DeviceOpt = "auto",
        dtype: DtypeOpt = "auto",
        trust_remote_code: TrustOpt = False,
    ) -> None:
        """Print the architecture, layer count, widths and every hook point with its shape."""
        print_info(load_model(model, device=device, dtype=dtype, trust_remote_code=trust_remote_code))

    @app.command(
        epilog='Examples:\n\n  lmscope predict smollm2-135m "The capital of France is"\n\n'
        '  lmscope predict ./model.gguf "def fib(n):" --top 5'
    )
    @handles_errors
    def predict(
        model: ModelArg,
        text: Annotated[str, typer.Argument(help="The prompt whose next token is predicted.")],
        top: Annotated[int, typer.Option(help="How many tokens to show.", min=1)] = 10,
        device: DeviceOpt = "auto",
        dtype: DtypeOpt = "auto",
        trust_remote_code: TrustOpt = False,
    ) -> None:
        """Print the most likely next tokens with their probabilities."""
        m = load_model(model, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
        print_predictions(text, predict_next(m, text, top))
