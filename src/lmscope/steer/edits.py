"""Steering and ablation: force dictionary features, raw directions or MLP neurons on or off.

Every dictionary edit is a *latent edit with the error term kept*: the activation x is encoded to z, the
edited latents z' are formed, and x' = x + (z' - z) @ W_dec. Because the decoder is linear, this equals
splicing the dictionary in (x' = decode(z') + error, with error = x - decode(z)) while never touching
what the dictionary fails to reconstruct. An edit that leaves z unchanged leaves x bit-identical.

Modes:
- add:VALUE      x + VALUE * W_dec[f]: what the feature would write at activation VALUE (its own units)
- clamp:VALUE    set the feature's activation to VALUE (or VALUE x its observed max with `clamp:VALUEx`)
- ablate         set the feature's activation to 0
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from lmscope.dictionaries.base import Dictionary
from lmscope.errors import LmscopeError
from lmscope.model.adapter import Model
from lmscope.model.hooks import Writer

Mode = Literal["add", "clamp", "ablate"]
MODES: tuple[str, ...] = ("add", "clamp", "ablate")


class SteeringError(LmscopeError):
    """A steering request that cannot be carried out as given."""


@dataclass(frozen=True)
class Edit:
    """One steering edit on a feature (or neuron) index."""

    index: int
    mode: Mode
    value: float = 0.0
    relative: bool = False  # clamp: value is a multiple of the feature's observed max activation

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise SteeringError(f"unknown steering mode {self.mode!r}; use one of {', '.join(MODES)}")
        if not math.isfinite(self.value):
            raise SteeringError(f"steering strength must be a finite number, got {self.value}")
        if self.relative and self.mode != "clamp":
            raise SteeringError("the 'x' suffix (a multiple of the observed max) only applies to clamp")


_EDIT = re.compile(r"^\s*(-?\d+)\s*=\s*([a-z]+)\s*(?::\s*([^x\s]+)\s*(x)?)?\s*$")


def parse_edit(text: str) -> Edit:
    """Parse `ID=MODE:VALUE` (e.g. `123=clamp:8`, `123=clamp:2x`, `45=add:-4`, `7=ablate`)."""
    m = _EDIT.match(text)
    if not m:
        raise SteeringError(
            f"cannot parse steering edit {text!r}; write ID=MODE:VALUE, e.g. 123=clamp:8, 123=clamp:2x "
            "(2 x the observed max), 45=add:-4 or 7=ablate"
        )
    index, mode, raw, rel = int(m.group(1)), m.group(2), m.group(3), m.group(4)
    if mode not in MODES:
        raise SteeringError(f"unknown steering mode {mode!r} in {text!r}; use one of {', '.join(MODES)}")
    if mode == "ablate":
        if raw is not None:
            raise SteeringError(f"ablate takes no value (it sets the feature to 0): {text!r}")
        return Edit(index, "ablate")
    if raw is None:
        raise SteeringError(f"{mode} needs a value: {text!r}, e.g. {index}={mode}:4")
    try:
        value = float(raw)
    except ValueError:
        raise SteeringError(f"steering strength {raw!r} in {text!r} is not a number") from None
    return Edit(index, mode, value, relative=bool(rel))  # type: ignore[arg-type]


def check_dictionary(model: Model, dictionary: Dictionary, hook: str | None = None) -> str:
    """The hook a dictionary reads, checked against the model (name and width)."""
    hook = hook or dictionary.cfg.hook
    if not hook:
        raise SteeringError("the dictionary does not name its hook; pass --hook (e.g. blocks.6.resid_post)")
    model.resolve(hook)
    width = hook_width(model, hook)
    if width != dictionary.cfg.d_in:
        raise SteeringError(
            f"dictionary/model mismatch: the dictionary reads {dictionary.cfg.d_in}-wide activations but "
            f"{hook} of {model.spec} is {width} wide; use a dictionary trained on this model"
        )
    return hook


def hook_width(model: Model, hook: str) -> int:
    ids = torch.zeros(1, 2, dtype=torch.long, device=model.device)
    with model.capture([hook]) as acts:
        model(ids)
    return int(acts[hook].shape[-1])


def _check_indices(edits: Sequence[Edit], size: int, what: str) -> None:
    for e in edits:
        if not 0 <= e.index < size:
            raise SteeringError(f"{what} {e.index} is out of range: valid ids are 0..{size - 1}")


def latent_edit_writer(
    dictionary: Dictionary,
    edits: Sequence[Edit],
    max_acts: Mapping[int, float] | None = None,
    from_prompt_end: bool = False,
) -> Writer:
    """A writer that applies feature edits through the dictionary with the error term kept."""
    edits = list(edits)
    _check_indices(edits, dictionary.cfg.d_sae, "feature")
    if dictionary.cfg.d_out != dictionary.cfg.d_in:
        raise SteeringError("steering needs an autoencoder (d_out == d_in); this dictionary is a transcoder")
    targets: dict[int, float] = {}
    for e in edits:
        if e.mode == "clamp" and e.relative:
            if not max_acts or e.index not in max_acts:
                raise SteeringError(
                    f"clamp:{e.value:g}x needs feature {e.index}'s observed max activation; pass --atlas ATLAS.db "
                    "or give an absolute value"
                )
            targets[e.index] = e.value * float(max_acts[e.index])
        elif e.mode in ("clamp", "ablate"):
            targets[e.index] = e.value if e.mode == "clamp" else 0.0
    adds = [(e.index, e.value) for e in edits if e.mode == "add"]
    clamp_idx = torch.tensor(sorted(targets), dtype=torch.long)
    clamp_val = torch.tensor([targets[i] for i in sorted(targets)])
    add_idx = torch.tensor([i for i, _ in adds], dtype=torch.long)
    add_val = torch.tensor([v for _, v in adds])

    def write(x: Tensor) -> Tensor:
        w_dec = dictionary.W_dec
        delta = torch.zeros_like(x)
        if len(clamp_idx):
            with torch.no_grad():
                z = dictionary.encode(x.to(w_dec.dtype))[..., clamp_idx.to(x.device)]
            change = clamp_val.to(z.device, z.dtype) - z
            delta = delta + (change @ w_dec[clamp_idx.to(w_dec.device)]).to(x.dtype)
        if len(add_idx):
            direction = add_val.to(w_dec.device, w_dec.dtype) @ w_dec[add_idx.to(w_dec.device)]
            delta = delta + direction.to(x.dtype)
        if from_prompt_end and x.shape[-2] > 1:
            # The prompt pass: only its last position; generation steps (one new token each) get all.
            mask = torch.zeros(x.shape[-2], 1, dtype=x.dtype, device=x.device)
            mask[-1] = 1
            delta = delta * mask
        return x + delta

    return write


def splice_writer(
    dictionary: Dictionary, edit_latents: Callable[[Tensor], Tensor], from_prompt_end: bool = False
) -> Writer:
    """Splice the dictionary in with the error term kept, editing the latents with any function:
    x' = decode(edit(z)) + (x - decode(z)) = x + (edit(z) - z) @ W_dec. The identity edit is exact."""

    def write(x: Tensor) -> Tensor:
        w_dec = dictionary.W_dec
        with torch.no_grad():
            z = dictionary.encode(x.to(w_dec.dtype))
        delta = ((edit_latents(z) - z) @ w_dec).to(x.dtype)
        if from_prompt_end and x.shape[-2] > 1:
            delta[..., :-1, :] = 0
        return x + delta

    return write


def neuron_writer(edits: Sequence[Edit], width: int, from_prompt_end: bool = False) -> Writer:
    """Edits on single units of a hook (e.g. MLP neurons of blocks.3.mlp_hidden)."""
    edits = list(edits)
    _check_indices(edits, width, "neuron")
    for e in edits:
        if e.relative:
            raise SteeringError("the 'x' suffix needs an atlas and applies to dictionary features, not neurons")

    def write(x: Tensor) -> Tensor:
        y = x.clone()
        sl = slice(-1, None) if from_prompt_end and x.shape[-2] > 1 else slice(None)
        for e in edits:
            col = y[..., sl, e.index]
            y[..., sl, e.index] = col + e.value if e.mode == "add" else torch.full_like(col, e.value)
        return y

    return write


def direction_writer(direction: Tensor, edit: Edit, from_prompt_end: bool = False) -> Writer:
    """Steer along a raw direction (e.g. a probe vector): add VALUE x unit direction, or clamp its coefficient."""
    direction = direction.flatten().float()
    if not torch.isfinite(direction).all() or direction.norm() == 0:
        raise SteeringError("the direction must be a finite, non-zero vector")
    unit = direction / direction.norm()

    def write(x: Tensor) -> Tensor:
        u = unit.to(x.device, x.dtype)
        if u.shape[-1] != x.shape[-1]:
            raise SteeringError(f"the direction has width {u.shape[-1]} but the hook is {x.shape[-1]} wide")
        if edit.mode == "add":
            delta = edit.value * u.expand_as(x)
        else:
            target = 0.0 if edit.mode == "ablate" else edit.value
            delta = (target - x @ u).unsqueeze(-1) * u
        if from_prompt_end and x.shape[-2] > 1:
            delta = delta.clone()
            delta[..., :-1, :] = 0
        return x + delta

    return write


@contextlib.contextmanager
def steer(
    model: Model,
    dictionary: Dictionary,
    features: Mapping[int, tuple[str, float]] | Sequence[Edit],
    hook: str | None = None,
    max_acts: Mapping[int, float] | None = None,
    from_prompt_end: bool = False,
) -> Iterator[Model]:
    """`with steer(model, sae, {123: ("clamp", 8.0)}): model(ids)` — undone on exit, exceptions included."""
    if isinstance(features, Mapping):
        edits = [Edit(int(i), mode, float(v)) for i, (mode, v) in features.items()]  # type: ignore[arg-type]
    else:
        edits = list(features)
    hook = check_dictionary(model, dictionary, hook)
    writer = latent_edit_writer(dictionary, edits, max_acts, from_prompt_end)
    with model.intervene({hook: writer}):
        yield model


# ---------------------------------------------------------------------- readouts for --measure
def _capture(model: Model, hook: str, ids: Tensor) -> Tensor:
    with model.capture([hook]) as acts:
        model(ids)
    return acts[hook][0]


def feature_readout(dictionary: Dictionary, hook: str, features: Sequence[int]) -> Callable[[Model, Tensor], dict]:
    """Per-token activations of dictionary features, from a clean forward pass."""

    def read(model: Model, ids: Tensor) -> dict[str, Tensor]:
        x = _capture(model, hook, ids)
        with torch.no_grad():
            z = dictionary.encode(x.to(dictionary.W_dec.dtype))
        return {f"feature {f}": z[:, f] for f in features}

    return read


def neuron_readout(hook: str, indices: Sequence[int]) -> Callable[[Model, Tensor], dict]:
    def read(model: Model, ids: Tensor) -> dict[str, Tensor]:
        x = _capture(model, hook, ids)
        return {f"{hook}:{i}": x[:, i] for i in indices}

    return read


def direction_readout(hook: str, direction: Tensor) -> Callable[[Model, Tensor], dict]:
    unit = direction.flatten().float() / direction.flatten().float().norm()

    def read(model: Model, ids: Tensor) -> dict[str, Tensor]:
        x = _capture(model, hook, ids)
        return {"direction": x.float() @ unit.to(x.device)}

    return read


def combine_readouts(readouts: Sequence[Callable[[Model, Tensor], dict]]) -> Callable[[Model, Tensor], dict]:
    def read(model: Model, ids: Tensor) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for r in readouts:
            out.update(r(model, ids))
        return out

    return read
