"""The `lmscope` Typer application: one module per command group registers its commands here."""

from __future__ import annotations

import typer

from lmscope._version import __version__
from lmscope.cli import (
    atlas_cmds,
    audit_cmds,
    circuit_cmds,
    convert_cmd,
    demo_cmd,
    diff_cmds,
    eval_cmd,
    explain_cmds,
    harvest_cmds,
    match_cmd,
    model_cmds,
    steer_cmds,
    toy_cmd,
    train_cmds,
)

app = typer.Typer(
    name="lmscope",
    help="lmscope: an MRI scanner for language models. Run `lmscope COMMAND --help` for examples.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
model_cmds.register(app)
demo_cmd.register(app)
harvest_cmds.register(app)
steer_cmds.register(app)
atlas_cmds.register(app)
train_cmds.register(app)
eval_cmd.register(app)
explain_cmds.register(app)
toy_cmd.register(app)
circuit_cmds.register(app)
diff_cmds.register(app)
audit_cmds.register(app)
match_cmd.register(app)
convert_cmd.register(app)


@app.command(epilog="Examples:\n\n  lmscope version")
def version() -> None:
    """Print the lmscope version."""
    typer.echo(__version__)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
