"""Plain-PyTorch hook dispatch on the real modules of a Hugging Face model.

Each (module, side) that anything listens to gets exactly one PyTorch hook. That hook runs the
registered *writers* (interventions) in registration order, then the *readers* (captures), so a capture
always sees the value that actually flows on. Removing the last listener removes the PyTorch hook, so
after every context exits the model carries no hooks at all.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lmscope.errors import HookError
from lmscope.model.families import IO

Reader = Callable[[torch.Tensor], None]
Writer = Callable[[torch.Tensor], torch.Tensor]


class StopForward(Exception):
    """Raised by a hook to end the forward pass once every requested activation has been read."""


def _first_tensor(value: Any) -> tuple[torch.Tensor, Callable[[torch.Tensor], Any]]:
    """The hidden-state tensor inside a module output, and a function that rebuilds the output."""
    if isinstance(value, torch.Tensor):
        return value, lambda t: t
    if isinstance(value, tuple) and value and isinstance(value[0], torch.Tensor):
        return value[0], lambda t: (t, *value[1:])
    raise HookError(f"cannot hook a module output of type {type(value).__name__}; expected a tensor or tuple")


def _input_tensor(args: tuple, kwargs: dict) -> tuple[torch.Tensor, Callable[[torch.Tensor], tuple]]:
    """The hidden-state input of a module (first positional argument or `hidden_states=`)."""
    if args and isinstance(args[0], torch.Tensor):
        return args[0], lambda t: ((t, *args[1:]), kwargs)
    if isinstance(kwargs.get("hidden_states"), torch.Tensor):
        return kwargs["hidden_states"], lambda t: (args, {**kwargs, "hidden_states": t})
    raise HookError("cannot find the hidden-state input of the hooked module (no tensor argument)")


@dataclass
class _SiteListeners:
    writers: list[Writer] = field(default_factory=list)
    readers: list[Reader] = field(default_factory=list)
    handle: Any = None

    def empty(self) -> bool:
        return not self.writers and not self.readers


def _apply(listeners: _SiteListeners, x: torch.Tensor) -> torch.Tensor:
    for write in listeners.writers:
        y = write(x)
        if not isinstance(y, torch.Tensor) or y.shape != x.shape:
            got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
            raise HookError(f"an intervention must return a tensor of shape {tuple(x.shape)}, got {got}")
        x = y
    for read in listeners.readers:
        read(x)
    return x


class HookDispatcher:
    """Owns every PyTorch hook that lmscope puts on one model."""

    def __init__(self, root: nn.Module) -> None:
        self.root = root
        self._sites: dict[tuple[str, IO], _SiteListeners] = {}

    def module(self, path: str) -> nn.Module:
        try:
            return self.root.get_submodule(path)
        except AttributeError as exc:
            raise HookError(f"the model has no module {path!r}") from exc

    def add(self, path: str, io: IO, *, reader: Reader | None = None, writer: Writer | None = None) -> Callable:
        """Register one listener; returns a function that removes it."""
        key = (path, io)
        site = self._sites.get(key)
        if site is None:
            site = self._sites[key] = _SiteListeners()
            site.handle = self._install(self.module(path), io, site)
        if writer is not None:
            site.writers.append(writer)
        if reader is not None:
            site.readers.append(reader)

        def remove() -> None:
            if writer is not None and writer in site.writers:
                site.writers.remove(writer)
            if reader is not None and reader in site.readers:
                site.readers.remove(reader)
            if site.empty() and self._sites.get(key) is site:
                site.handle.remove()
                del self._sites[key]

        return remove

    @staticmethod
    def _install(module: nn.Module, io: IO, site: _SiteListeners) -> Any:
        if io == "in":

            def pre_hook(_mod: nn.Module, args: tuple, kwargs: dict) -> Any:
                x, rebuild = _input_tensor(args, kwargs)
                y = _apply(site, x)
                return rebuild(y) if y is not x else None

            return module.register_forward_pre_hook(pre_hook, with_kwargs=True)

        def post_hook(_mod: nn.Module, _args: tuple, output: Any) -> Any:
            x, rebuild = _first_tensor(output)
            y = _apply(site, x)
            return rebuild(y) if y is not x else None

        return module.register_forward_hook(post_hook)

    def active(self) -> int:
        """How many (module, side) pairs currently carry a hook."""
        return len(self._sites)
