"""Options and error handling shared by every CLI command."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

from lmscope.errors import LmscopeError

console = Console()
err_console = Console(stderr=True)

F = TypeVar("F", bound=Callable[..., Any])

ModelArg = Annotated[
    str,
    typer.Argument(
        help="Model spec: a local HF directory, a .gguf file, a hub id from the local cache, "
        "or the alias smollm2-135m (the embedded default).",
        show_default=True,
    ),
]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto (CUDA if present), cpu, cuda, cuda:N, mps.")]
DtypeOpt = Annotated[
    str, typer.Option("--dtype", help="auto (fp32 on CPU, bf16 on GPU), float32, bfloat16, float16.")
]
TrustOpt = Annotated[
    bool, typer.Option("--trust-remote-code", help="Allow a model's own Python code to run (read it first).")
]


def handles_errors(fn: F) -> F:
    """Print an LmscopeError as one clear message and exit with status 2, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except LmscopeError as exc:
            err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]
