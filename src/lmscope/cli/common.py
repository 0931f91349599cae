"""Options and error handling shared by every CLI command."""

from __future__ import annotations

import functools
import re
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
DtypeOpt = Annotated[str, typer.Option("--dtype", help="auto (fp32 on CPU, bf16 on GPU), float32, bfloat16, float16.")]
TrustOpt = Annotated[
    bool, typer.Option("--trust-remote-code", help="Allow a model's own Python code to run (read it first).")
]


_SUFFIX = {"": 1, "k": 1_000, "m": 1_000_000, "g": 1_000_000_000, "b": 1_000_000_000}


def parse_count(text: str, minimum: int = 0) -> int:
    """'2M' -> 2_000_000, '1.5k' -> 1500, '1e6' -> 1_000_000, '65536' -> 65536."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmgb]?)\s*", text.lower())
    if not m:
        raise LmscopeError(f"cannot read {text!r} as a count; write e.g. 2M, 500k, 1e6 or 65536")
    value = int(float(m.group(1)) * _SUFFIX[m.group(2)])
    if value < minimum:
        raise LmscopeError(f"the count must be at least {minimum}, got {text!r}")
    return value


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
