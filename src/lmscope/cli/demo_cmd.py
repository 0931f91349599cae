"""`lmscope demo`: the main job on the embedded default. Until the full pipeline lands it shows the
model adapter at work: the default model's hook points and a next-token prediction."""

from __future__ import annotations

import typer

from lmscope.cli.common import DeviceOpt, DtypeOpt, console, handles_errors
from lmscope.cli.model_cmds import predict_next, print_info, print_predictions
from lmscope.loading import load_model

DEMO_PROMPT = "The capital of France is"


def register(app: typer.Typer) -> None:
    @app.command(epilog="Examples:\n\n  lmscope demo\n\n  lmscope demo --device cuda")
    @handles_errors
    def demo(
        model: str = typer.Option("smollm2-135m", help="Model spec (default: the embedded SmolLM2)."),
        device: DeviceOpt = "auto",
        dtype: DtypeOpt = "auto",
    ) -> None:
        """Run the main job on the embedded default model (SmolLM2-135M-Instruct)."""
        m = load_model(model, device=device, dtype=dtype)
        print_info(m)
        print_predictions(DEMO_PROMPT, predict_next(m, DEMO_PROMPT, top=5))
        console.print(
            "Next: harvesting activations, training dictionaries and building the atlas "
            "(see docs/architecture.md for what exists so far)."
        )
