"""`lmscope convert`: a dictionary of any format lmscope reads, written as lmscope's or SAELens's."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lmscope.cli.common import console, handles_errors
from lmscope.dictionaries.pretrained import FORMATS, convert_dictionary, detect_format, open_dictionary

EPILOG = """Examples:

  lmscope convert saelens/blocks.6.hook_resid_post --to lmscope --out dicts/l6

  lmscope convert runs/demo/dict --to saelens --out export/l10      (hook written as blocks.10.hook_resid_post)

  lmscope convert gemma-scope/params.npz --hook blocks.12.resid_post --to lmscope --out dicts/gs12

SRC may be an lmscope, SAELens (v5 or v6) or sparsify folder (a hook folder, or the checkpoint with --hook), or a
Gemma Scope params.npz / .safetensors. Hook names are translated (TransformerLens's and sparsify's to lmscope's,
and lmscope's to TransformerLens's for SAELens); a hook with no exact equal is refused with the reason."""


def register(app: typer.Typer) -> None:
    @app.command(epilog=EPILOG)
    @handles_errors
    def convert(
        src: Annotated[Path, typer.Argument(help=f"The dictionary to convert ({', '.join(FORMATS)}).")],
        to: Annotated[str, typer.Option("--to", help="lmscope or saelens.")],
        out: Annotated[Path, typer.Option("--out", help="A new (or empty) folder to write.")],
        hook: Annotated[
            str | None, typer.Option(help="The hook: a sparsify checkpoint's folder, or for a file naming none.")
        ] = None,
    ) -> None:
        """Convert a dictionary between formats (exact: the weights are copied, settings that only rescale are
        folded in, anything that cannot be represented is refused)."""
        fmt = detect_format(src)
        path = convert_dictionary(src, to, out, hook=hook)
        d = open_dictionary(path)
        console.print(f"{src} ({fmt}, {d.arch}, d_in {d.cfg.d_in}, d_sae {d.cfg.d_sae}, hook {d.cfg.hook}) -> "
                      f"{path} ({to})", highlight=False)  # fmt: skip
