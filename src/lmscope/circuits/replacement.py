"""The local replacement model of one prompt, run through the real Hugging Face modules with hooks.

`record` runs the model once and keeps what the replacement model freezes:
- the query and key projections of every layer (`attn_q`, `attn_k`): the attention pattern is a function of them
  alone, so writing the recorded values back freezes it, whatever flows into the values;
- every normalisation's input and output (`Model.norm_paths`): each norm becomes the affine map
  `y0 + A(x - x0) * s(x0) * w` (lmscope.model.norms), equal to the real output at the recorded input;
- each layer's MLP input and output, and the transcoder's active features, reconstruction and error there.

`Replacement.run` then reruns the real modules with those hooks in place. Each MLP's output is replaced by a
tensor the caller chooses (by default: reconstruction + error, which is the real output), the MLP's own input is
detached so no gradient flows through it, and the block-0 input (the embeddings, after any scaling and position
embeddings) is another tensor the caller chooses. With attention, norms and feature activations frozen, every
target (a logit, a feature's pre-activation) is an affine function of those tensors: its gradient is the
direct effect, and running it with a perturbed input measures the same thing by the forward pass.

Families whose attention cannot be frozen this way (no `attn_q`/`attn_k` hooks, or no additive `mlp_out`) are
refused with the reason.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor

from lmscope.circuits.transcoders import SparseActs, TranscoderSet
from lmscope.errors import CircuitError, HookError
from lmscope.model.adapter import Model
from lmscope.model.norms import FrozenNorm

MlpOut = Callable[[int, Tensor], Tensor]  # (layer, the MLP's current input [B, n, d]) -> its output [B, n, d]


def check_family(model: Model) -> None:
    """Refuse a model whose attention pattern or MLP contribution lmscope cannot isolate."""
    fam = model.family
    for kind, why in (
        ("attn_q", "its query projection"),
        ("attn_k", "its key projection"),
        ("mlp_in", "the MLP's input"),
        ("mlp_out", "an additive MLP output"),
    ):
        if f"blocks.0.{kind}" not in model.hook_points:
            reason = fam.missing.get(kind, f"the {fam.name} hook map has no {kind} site")
            raise CircuitError(
                f"attribution graphs cannot freeze attention in the {fam.name} family: lmscope needs {why} "
                f"(blocks.i.{kind}), and {reason}"
            )
    if "logits" not in model.hook_points:
        raise CircuitError(f"attribution graphs need the model's logits; this {fam.name} model has no LM head")


@dataclass
class Recording:
    """One forward pass of the real model on one prompt, and the transcoders' view of it."""

    ids: Tensor  # [n]
    logits: Tensor  # [n, vocab]: lm_head's raw output (before any softcap)
    embed: Tensor  # [n, d]: block 0's input
    mlp_in: dict[int, Tensor]
    mlp_out: dict[int, Tensor]
    acts: dict[int, SparseActs]
    recon: dict[int, Tensor]
    error: dict[int, Tensor]
    q: dict[int, Tensor] = field(repr=False, default_factory=dict)
    k: dict[int, Tensor] = field(repr=False, default_factory=dict)
    norms: dict[str, tuple[FrozenNorm, Tensor]] = field(repr=False, default_factory=dict)

    @property
    def n_pos(self) -> int:
        return int(self.ids.shape[0])


@torch.no_grad()
def record(model: Model, tcs: TranscoderSet, ids: Tensor) -> Recording:
    check_family(model)
    tcs.check(model)
    ids = ids.reshape(-1)
    L = model.n_layers
    hooks = ["blocks.0.resid_pre", "logits"]
    hooks += [f"blocks.{i}.{k}" for i in range(L) for k in ("attn_q", "attn_k", "mlp_in", "mlp_out")]
    seen: dict[str, dict[str, Tensor]] = {p: {} for p in model.norm_paths()}
    with contextlib.ExitStack() as stack:
        acts = stack.enter_context(model.capture(hooks, stop_early=False))
        for path in seen:
            for io in ("in", "out"):
                stack.enter_context(model.on_module(path, io, reader=_keep(seen[path], io)))
        model(ids.unsqueeze(0))
    norms: dict[str, tuple[FrozenNorm, Tensor]] = {}
    for path, xy in seen.items():
        if "in" not in xy:
            continue  # a norm the forward pass did not reach
        frozen = FrozenNorm(model.hf.get_submodule(path), xy["in"])
        try:
            frozen.check(xy["out"], path)
        except HookError as exc:
            raise CircuitError(str(exc)) from exc
        norms[path] = (frozen, xy["out"])
    rec = Recording(
        ids=ids.cpu(),
        logits=acts["logits"][0].float().cpu(),
        embed=acts["blocks.0.resid_pre"][0],
        mlp_in={}, mlp_out={}, acts={}, recon={}, error={},
        q={i: acts[f"blocks.{i}.attn_q"] for i in range(L)},
        k={i: acts[f"blocks.{i}.attn_k"] for i in range(L)},
        norms=norms,
    )  # fmt: skip
    for i in range(L):
        x, y = acts[f"blocks.{i}.mlp_in"][0], acts[f"blocks.{i}.mlp_out"][0]
        a = tcs.encode(i, x)
        recon = (tcs.decode(i, a).to(y.device) + tcs.skip(i, x).float()).to(y.dtype)
        rec.mlp_in[i], rec.mlp_out[i], rec.acts[i], rec.recon[i] = x, y, a, recon
        rec.error[i] = y - recon
    return rec


def _keep(store: dict[str, Tensor], io: str) -> Callable[[Tensor], None]:
    def read(x: Tensor) -> None:
        store[io] = x.detach().clone()

    return read


class Replacement:
    """Reruns of the frozen replacement model of one recording."""

    def __init__(self, model: Model, tcs: TranscoderSet, rec: Recording) -> None:
        self.model, self.tcs, self.rec = model, tcs, rec

    def default_mlp_out(self) -> MlpOut:
        """Each MLP's output as recorded (reconstruction + error), as a constant.

        Every `MlpOut` gives the output with a skip-transcoder's skip term taken at the *recorded* MLP input; the
        hooks add `(x - x_recorded) @ W_skip`, so the skip path stays linear and live in the replacement model."""
        return lambda layer, _x: self.rec.mlp_out[layer].unsqueeze(0)

    def recomputed_mlp_out(self, edits: dict[tuple[int, int, int], float] | None = None) -> MlpOut:
        """Each MLP replaced by its transcoder on the current input, plus the recorded error; `edits` sets the
        activation of (layer, position, feature) to a value (the local replacement model run forward)."""
        edits = edits or {}

        def out(layer: int, x: Tensor) -> Tensor:
            t = self.tcs[layer]
            z = t.encode(x[0].float())
            for (lay, pos, feat), value in edits.items():
                if lay == layer:
                    z[pos, feat] = value
            recon = t.decode(z).to(x.dtype) + self.tcs.skip(layer, self.rec.mlp_in[layer])  # skip at the recorded input
            return (recon + self.rec.error[layer]).unsqueeze(0)

        return out

    @contextlib.contextmanager
    def hooks(self, embed: Tensor, mlp_out: MlpOut, mlp_in: dict[int, Tensor]) -> Iterator[None]:
        """Freeze attention and norms; write `embed` into block 0 and `mlp_out(layer, x)` as each MLP's output.

        `mlp_in` receives each layer's MLP input of the run (with its graph, for gradients)."""
        model, rec = self.model, self.rec
        edits: dict[str, object] = {"blocks.0.resid_pre": lambda _x: embed}
        for i in range(model.n_layers):
            edits[f"blocks.{i}.attn_q"] = _const(rec.q[i])
            edits[f"blocks.{i}.attn_k"] = _const(rec.k[i])

            def take_in(x: Tensor, i: int = i) -> Tensor:
                mlp_in[i] = x
                return x.detach()  # the real MLP still runs, but nothing flows back through it

            skips = self.tcs[i].cfg.skip

            def give_out(_y: Tensor, i: int = i, skips: bool = skips) -> Tensor:
                out = mlp_out(i, mlp_in[i])
                if skips:  # a skip-transcoder's x @ W_skip is linear in the MLP input: it stays live
                    out = out + self.tcs.skip(i, mlp_in[i] - rec.mlp_in[i])
                return out

            edits[f"blocks.{i}.mlp_in"] = take_in
            edits[f"blocks.{i}.mlp_out"] = give_out
        with contextlib.ExitStack() as stack:
            # norms first: on sandwich-norm families mlp_out is a norm's output, and the MLP's replacement must win
            for path, (frozen, y0) in rec.norms.items():
                seen: dict[str, Tensor] = {}
                stack.enter_context(model.on_module(path, "in", reader=_keep_live(seen)))
                stack.enter_context(model.on_module(path, "out", writer=_frozen(frozen, y0, seen)))
            stack.enter_context(model.intervene(edits))  # type: ignore[arg-type]
            yield

    def run(
        self, embed: Tensor | None = None, mlp_out: MlpOut | None = None, grad: bool = False, copies: int = 1
    ) -> tuple[Tensor, dict[int, Tensor]]:
        """(raw logits [copies, n, vocab], MLP inputs by layer [copies, n, d]) of one run of the replacement model
        on `copies` copies of the prompt (each may carry different `embed` and MLP outputs)."""
        embed = self.rec.embed.unsqueeze(0) if embed is None else embed
        mlp_in: dict[int, Tensor] = {}
        with (
            self.hooks(embed, mlp_out or self.default_mlp_out(), mlp_in),
            self.model.capture(["logits"], stop_early=False, grad=grad) as acts,
        ):
            self.model.forward(self.rec.ids.unsqueeze(0).expand(copies, -1), grad=grad)
        return acts["logits"], mlp_in


def _const(value: Tensor) -> Callable[[Tensor], Tensor]:
    def write(x: Tensor) -> Tensor:
        return value.to(x.dtype).expand_as(x)

    return write


def _keep_live(store: dict[str, Tensor]) -> Callable[[Tensor], None]:
    def read(x: Tensor) -> None:
        store["x"] = x

    return read


def _frozen(frozen: FrozenNorm, y0: Tensor, seen: dict[str, Tensor]) -> Callable[[Tensor], Tensor]:
    def write(_y: Tensor) -> Tensor:
        x = seen["x"]
        return y0.to(x.dtype) + frozen.linear(x - frozen.x0.to(x.dtype))

    return write
