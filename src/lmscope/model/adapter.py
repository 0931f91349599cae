"""`Model`: a thin adapter around an unmodified Hugging Face model, with named hook points.

lmscope never reimplements a model. It hooks the real modules, so logits are those of Hugging Face.
"""

from __future__ import annotations

import contextlib
import difflib
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from lmscope.errors import HookError
from lmscope.model.families import BLOCK_KINDS, IO, FamilyMap, Site, family_for, generic_family
from lmscope.model.hooks import HookDispatcher, StopForward, Writer

_BLOCK_NAME = re.compile(r"^blocks\.(\d+)\.(\w+)$")


@dataclass(frozen=True)
class HookPoint:
    name: str
    kind: str
    layer: int | None
    module: str  # dotted path from the top-level HF model ("" is the model itself)
    io: IO
    cols: tuple[int, ...] | None = None  # a fused projection: the columns of the module's output that are this hook


def _index(point: HookPoint) -> torch.Tensor | None:
    return torch.tensor(point.cols, dtype=torch.long) if point.cols is not None else None


class Activations(dict[str, torch.Tensor]):
    """Captured activations by hook name, from the most recent forward pass inside `capture`."""

    def __missing__(self, key: str) -> torch.Tensor:
        have = ", ".join(sorted(self)) or "nothing yet (run model(...) inside the with-block)"
        raise KeyError(f"{key!r} was not captured; captured: {have}")


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _module_paths(root: nn.Module, depth: int = 3, limit: int = 60) -> list[str]:
    paths = [n for n, _ in root.named_modules() if n and n.count(".") < depth]
    return paths[:limit] + ([f"... ({len(paths) - limit} more)"] if len(paths) > limit else [])


def _find_block_list(root: nn.Module) -> str:
    """The generic fallback: the ModuleList of identical modules holding the most parameters."""
    best, best_params = None, -1
    for name, mod in root.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and len({type(m) for m in mod}) == 1:
            params = sum(p.numel() for p in mod.parameters())
            if params > best_params:
                best, best_params = name, params
    if best is None:
        raise HookError(
            f"cannot find the transformer blocks of {type(root).__name__}: no ModuleList of identical "
            f"modules. Module paths seen: {', '.join(_module_paths(root))}"
        )
    return best


class Model:
    """An unmodified HF model plus its tokenizer, with lmscope's hook naming scheme."""

    def __init__(self, hf_model: nn.Module, tokenizer: Any = None, spec: str = "<in-memory>") -> None:
        self.hf = hf_model.eval()
        self.tokenizer = tokenizer
        self.spec = spec
        self.config: Any = hf_model.config  # a transformers PretrainedConfig
        self._dispatch = HookDispatcher(hf_model)
        base = getattr(hf_model, "base_model", hf_model)
        self._base_path = next((n for n, m in hf_model.named_modules() if m is base), "")
        family = family_for(self.config)
        if family is None:
            family = generic_family(_find_block_list(base))
        self.family: FamilyMap = family
        self._blocks_path = _join(self._base_path, family.blocks)
        try:
            blocks = hf_model.get_submodule(self._blocks_path)
        except AttributeError as exc:
            raise HookError(
                f"{family.name} hook map expects blocks at {self._blocks_path!r}, which this "
                f"{type(hf_model).__name__} lacks. Module paths seen: {', '.join(_module_paths(hf_model))}"
            ) from exc
        self.n_layers = len(cast(nn.ModuleList, blocks))
        self.hook_points: dict[str, HookPoint] = self._build_hook_points()

    # ------------------------------------------------------------------ description
    def _site_path(self, site: Site, layer: int | None = None, top: bool = False) -> str:
        if layer is not None:
            return _join(self._blocks_path, str(layer), site.module)
        return site.module if top else _join(self._base_path, site.module)

    def _build_hook_points(self) -> dict[str, HookPoint]:
        fam = self.family
        points: dict[str, HookPoint] = {}

        def put(
            name: str, kind: str, layer: int | None, path: str, io: IO, cols: tuple[int, ...] | None = None
        ) -> None:
            try:
                self.hf.get_submodule(path)
            except AttributeError:
                return  # e.g. a bare BertModel has no `cls` head, so no logits hook
            points[name] = HookPoint(name, kind, layer, path, io, cols)

        if fam.embed:
            put("embed", "embed", None, self._site_path(fam.embed), fam.embed.io)
        for i in range(self.n_layers):
            block = _join(self._blocks_path, str(i))
            for kind in BLOCK_KINDS:
                name = f"blocks.{i}.{kind}"
                if kind == "resid_pre":
                    put(name, kind, i, block, "in")
                elif kind == "resid_post":
                    put(name, kind, i, block, "out")
                elif kind in fam.block_sites:
                    site = fam.block_sites[kind]
                    cols = site.cols.indices() if site.cols is not None else None
                    put(name, kind, i, self._site_path(site, i), site.io, cols)
        if fam.final_norm:
            put("final_norm", "final_norm", None, self._site_path(fam.final_norm), fam.final_norm.io)
        if fam.logits:
            put("logits", "logits", None, self._site_path(fam.logits, top=True), fam.logits.io)
        return points

    @property
    def device(self) -> torch.device:
        return next(self.hf.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.hf.parameters()).dtype

    @property
    def d_model(self) -> int:
        return int(self.config.hidden_size)

    @property
    def d_mlp(self) -> int | None:
        for attr in ("intermediate_size", "n_inner"):
            if getattr(self.config, attr, None):
                return int(getattr(self.config, attr))
        return 4 * self.d_model if self.config.model_type == "gpt2" else None

    @property
    def logit_softcap(self) -> float | None:
        """Gemma 2 style final softcapping, applied by HF *after* lm_head, outside any module.

        The `logits` hook is lm_head's output, so on such models it holds the raw logits and
        model(...) returns `cap * tanh(raw / cap)`.
        """
        cap = getattr(self.config, "final_logit_softcapping", None)
        return float(cap) if cap else None

    def notes(self) -> list[str]:
        """Facts about this model's hook points that a user should know."""
        out = [f"no {kind}: {reason}" for kind, reason in self.family.missing.items()]
        if self.logit_softcap:
            out.append(
                f"logits: the hook holds lm_head's raw output; the model returns them softcapped as "
                f"{self.logit_softcap:g}*tanh(logits/{self.logit_softcap:g})"
            )
        return out

    @property
    def vocab_size(self) -> int:
        return int(self.config.vocab_size)

    def hook_names(self) -> list[str]:
        return list(self.hook_points)

    def resolve(self, name: str) -> HookPoint:
        """The hook point for a name, or a HookError that says why not and what is close."""
        if name in self.hook_points:
            return self.hook_points[name]
        m = _BLOCK_NAME.match(name)
        kind = m.group(2) if m else name
        if m and kind in BLOCK_KINDS and int(m.group(1)) >= self.n_layers:
            raise HookError(
                f"{name}: layer {m.group(1)} is out of range; this model has {self.n_layers} blocks "
                f"(0..{self.n_layers - 1})"
            )
        if kind in self.family.missing:
            msg = f"{name} is not available for {self.family.name}: {self.family.missing[kind]}"
            if self.family.name == "generic":
                msg += f". Module paths seen: {', '.join(_module_paths(self.hf))}"
            raise HookError(msg)
        close = difflib.get_close_matches(name, self.hook_points, n=5, cutoff=0.5)
        hint = f"closest valid names: {', '.join(close)}" if close else "run `lmscope info MODEL` to list them"
        raise HookError(f"unknown hook {name!r}; {hint}")

    # ------------------------------------------------------------------ running
    def _inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> dict[str, Any]:
        if input_ids.ndim == 1:
            input_ids = input_ids.unsqueeze(0)
        kwargs: dict[str, Any] = {"input_ids": input_ids.to(self.device)}
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask.to(self.device)
        if getattr(self.config, "use_cache", False) or self.config.is_decoder or hasattr(self.hf, "generate"):
            kwargs["use_cache"] = False
        return kwargs

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, grad: bool = False
    ) -> torch.Tensor | None:
        """Logits of the unmodified HF forward pass, or None if a capture stopped it early."""
        ctx = contextlib.nullcontext() if grad else torch.no_grad()
        with ctx:
            try:
                out = self.hf(**self._inputs(input_ids, attention_mask))
            except StopForward:
                return None
        return out.logits if hasattr(out, "logits") else out[0]

    __call__ = forward

    def encode(self, text: str | Sequence[str], **kwargs: Any) -> torch.Tensor:
        if self.tokenizer is None:
            raise HookError("this Model has no tokenizer; pass token ids instead of text")
        return self.tokenizer(text, return_tensors="pt", **kwargs)["input_ids"]

    # ------------------------------------------------------------------ hooks
    def _stop_site(self, points: Iterable[HookPoint]) -> tuple[str, IO] | None:
        points = list(points)
        if any(p.kind in ("final_norm", "logits") for p in points):
            return None
        layers = [p.layer for p in points if p.layer is not None]
        if layers:
            return _join(self._blocks_path, str(max(layers))), "out"
        return (points[0].module, points[0].io) if points else None

    @contextlib.contextmanager
    def capture(self, hooks: Sequence[str], stop_early: bool = True, grad: bool = False) -> Iterator[Activations]:
        """Record activations at `hooks` during `model(...)` calls inside the block.

        With `stop_early`, the forward pass ends after the last hooked layer (model(...) then returns
        None), so reading layer 6 of a 30-layer model costs about 6 layers.
        """
        points = [self.resolve(h) for h in hooks]
        acts = Activations()
        removers: list[Callable[[], None]] = []

        def reader(p: HookPoint) -> Callable[[torch.Tensor], None]:
            index = _index(p)

            def read(x: torch.Tensor) -> None:
                if index is not None:
                    x = x.index_select(-1, index.to(x.device))
                acts[p.name] = x.clone() if grad else x.detach().clone()

            return read

        try:
            for p in points:
                removers.append(self._dispatch.add(p.module, p.io, reader=reader(p)))
            stop = self._stop_site(points) if stop_early else None
            if stop is not None:

                def halt(_: torch.Tensor) -> None:
                    raise StopForward

                removers.append(self._dispatch.add(*stop, reader=halt))
            yield acts
        finally:
            for remove in reversed(removers):
                remove()

    @contextlib.contextmanager
    def intervene(self, edits: Mapping[str, Writer | Sequence[Writer]]) -> Iterator[Model]:
        """Edit activations during `model(...)` calls inside the block; on exit the model is as before."""
        resolved = [(self.resolve(name), fns) for name, fns in edits.items()]
        removers: list[Callable[[], None]] = []
        try:
            for point, fns in resolved:
                for fn in [fns] if callable(fns) else list(fns):
                    removers.extend(self._add_writer(point, fn))
            yield self
        finally:
            for remove in reversed(removers):
                remove()

    def _add_writer(self, point: HookPoint, fn: Writer) -> list[Callable[[], None]]:
        index = _index(point)
        if index is not None:  # a slice of a fused projection: edit those columns, keep the rest
            inner = fn

            def sliced(x: torch.Tensor) -> torch.Tensor:
                i = index.to(x.device)
                part = x.index_select(-1, i)
                new = inner(part)
                if new is part:
                    return x
                if not isinstance(new, torch.Tensor) or new.shape != part.shape:
                    got = tuple(new.shape) if isinstance(new, torch.Tensor) else type(new).__name__
                    raise HookError(f"an intervention on {point.name} must return shape {tuple(part.shape)}, got {got}")
                return x.index_copy(-1, i, new)

            fn = sliced
        via = self.family.resid_mid_write_via
        if point.kind != "resid_mid" or via is None:
            return [self._dispatch.add(point.module, point.io, writer=fn)]
        # resid_mid = resid_pre + attn_out. Write it as a delta on attn_out so the edit reaches both the
        # MLP and the residual branch. A no-op edit leaves attn_out bit-identical.
        assert point.layer is not None
        target = self.hook_points[f"blocks.{point.layer}.{via}"]
        stash: dict[str, torch.Tensor] = {}

        def remember(x: torch.Tensor) -> None:
            stash["resid_pre"] = x

        def delta(attn: torch.Tensor) -> torch.Tensor:
            mid = stash["resid_pre"] + attn
            return attn + (fn(mid) - mid)

        block = _join(self._blocks_path, str(point.layer))
        return [
            self._dispatch.add(block, "in", reader=remember),
            self._dispatch.add(target.module, target.io, writer=delta),
        ]

    def norm_paths(self) -> list[str]:
        """Module paths of every normalisation on the residual and value paths: each block's, then the final norm."""
        paths = [_join(self._blocks_path, str(i), n) for i in range(self.n_layers) for n in self.family.norms]
        if self.family.final_norm is not None:
            paths.append(self._site_path(self.family.final_norm))
        return paths

    @contextlib.contextmanager
    def on_module(
        self, path: str, io: IO, reader: Callable[[torch.Tensor], None] | None = None, writer: Writer | None = None
    ) -> Iterator[None]:
        """A reader and/or writer on any module's input or output (for paths this class lists, e.g. `norm_paths`),
        through the same dispatcher as the named hooks, so they keep its order and leave no hook behind."""
        remove = self._dispatch.add(path, io, reader=reader, writer=writer)
        try:
            yield
        finally:
            remove()

    def hooks_active(self) -> int:
        """Number of PyTorch hooks lmscope has on the model (0 outside capture/intervene)."""
        return self._dispatch.active()

    def __repr__(self) -> str:
        return (
            f"Model({self.spec!r}, family={self.family.name}, layers={self.n_layers}, "
            f"d_model={self.d_model}, device={self.device}, dtype={self.dtype})"
        )
