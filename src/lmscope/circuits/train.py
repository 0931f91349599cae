"""Transcoders at every layer from one streaming pass, and how well the whole set replaces the MLPs.

`train_transcoders` runs the model over the corpus once per step, reading every chosen layer's `mlp_in` and
`mlp_out` in the same forward pass (`activations.sources.StreamSource`), and trains one transcoder per layer on
them with the ordinary trainer (checkpoints, kill -9 resume, DDP under torchrun). Nothing is written to disk but
the dictionaries, the checkpoint and `transcoders.json`.

`evaluate_set` reports, on held-out text, each layer's FVU and the CE loss when **every** MLP is replaced by its
transcoder at once (each reads the MLP input of the spliced model, so errors compound as they would in a graph),
against the clean model and against every MLP zero-ablated:
`ce_recovered = (ce_zero - ce_spliced) / (ce_zero - ce_clean)`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lmscope.activations.sources import StreamSource
from lmscope.circuits.transcoders import MANIFEST, TranscoderSet
from lmscope.core.atomic import atomic_write_json
from lmscope.core.progress import ProgressCallback, ProgressEvent, resolve
from lmscope.corpora import CorpusError
from lmscope.dictionaries.base import DictConfig, architecture
from lmscope.dictionaries.metrics import FVUAccumulator
from lmscope.errors import CircuitError
from lmscope.model.adapter import Model
from lmscope.training import RunSpec, TrainConfig, Trainer
from lmscope.training import distributed as ddp
from lmscope.training.evaluate import eval_contexts, next_token_ce, next_token_kl


@dataclass
class TranscoderRecipe:
    layers: list[int] | None = None  # None: every layer
    arch: str = "topk"
    k: int = 32
    expansion: float = 8.0
    skip: bool = False  # skip-transcoders: an affine x @ W_skip term beside the sparse code
    tokens: int = 2_000_000
    batch_size: int = 4096
    context: int = 128
    lr: float | None = None
    warmup_steps: int = 100
    seed: int = 0
    checkpoint_every: int = 50
    eval_tokens: int = 8192
    norm_sample_tokens: int = 16_384  # tokens that estimate each hook's mean norm (input scaling) before training


def parse_layers(text: str, n_layers: int) -> list[int]:
    """'all', '3', '0,4,8' or '2-5' -> layer indices, checked against the model."""
    text = text.strip()
    if text == "all":
        return list(range(n_layers))
    out: list[int] = []
    try:
        for part in text.split(","):
            if "-" in part:
                a, b = part.split("-")
                out += range(int(a), int(b) + 1)
            elif part.strip():
                out.append(int(part))
    except ValueError:
        raise CircuitError(f"cannot read --layers {text!r}; write all, 3, 0,4,8 or 2-5") from None
    bad = [i for i in out if not 0 <= i < n_layers]
    if bad or not out:
        raise CircuitError(f"--layers {text!r}: the model has layers 0..{n_layers - 1}")
    return sorted(set(out))


def _run_name(layer: int) -> str:
    return f"layer{layer:02d}"


def train_transcoders(
    model: Model,
    corpus: str,
    out: str | Path,
    recipe: TranscoderRecipe,
    progress: ProgressCallback | bool | None = None,
    device: str | torch.device = "cpu",
    resume: bool = True,
) -> dict[str, Any]:
    """Train one transcoder per layer from one stream (see the module docstring); returns transcoders.json."""
    out = Path(out)
    layers = recipe.layers if recipe.layers is not None else list(range(model.n_layers))
    hooks = [h for i in layers for h in (f"blocks.{i}.mlp_in", f"blocks.{i}.mlp_out")]
    source = StreamSource(model, corpus, hooks, recipe.batch_size, recipe.context, recipe.norm_sample_tokens)
    cls = architecture(recipe.arch)
    runs = []
    for i in layers:
        d_in, d_out = source.widths[f"blocks.{i}.mlp_in"], source.widths[f"blocks.{i}.mlp_out"]
        cfg = DictConfig(arch=recipe.arch, d_in=d_in, d_sae=round(d_in * recipe.expansion), d_out=d_out, k=recipe.k,
                         hook=f"blocks.{i}.mlp_in", hook_out=f"blocks.{i}.mlp_out", model=model.spec,
                         skip=recipe.skip)  # fmt: skip
        runs.append(RunSpec(cfg, name=_run_name(i), lr=recipe.lr if recipe.lr is not None else cls.default_lr(cfg)))
    tc = TrainConfig(total_tokens=recipe.tokens, warmup_steps=recipe.warmup_steps, seed=recipe.seed,
                     checkpoint_every=recipe.checkpoint_every, log_every=10)  # fmt: skip
    trainer = Trainer(runs, tc, out, device=device)
    trainer.fit(source, resume=resume, progress=_one_task(resolve(progress), [r.name or "" for r in runs]))
    info: dict[str, Any] = {"model": model.spec, "corpus": corpus, "layers": layers, "recipe": asdict(recipe),
                            "tokens": trainer.tokens, "steps": trainer.step}  # fmt: skip
    if ddp.is_main():
        tcs = TranscoderSet.load(out)
        try:  # held out: the text after what training read
            info["eval"] = evaluate_set(
                model, tcs, corpus, recipe.eval_tokens, recipe.context, skip_tokens=trainer.tokens
            )
            info["eval"]["held_out"] = True
        except CorpusError:  # the corpus ends before: say so, and measure on its start
            info["eval"] = evaluate_set(model, tcs, corpus, recipe.eval_tokens, recipe.context)
            info["eval"]["held_out"] = False
        atomic_write_json(out / MANIFEST, info)
    return info


def _one_task(progress: ProgressCallback | None, names: list[str]) -> ProgressCallback | None:
    """One progress task for the whole set ("transcoders ×N"): the trainer reports one per layer, and 30 bars say
    less than one with the layers' mean and worst FVU."""
    if progress is None:
        return None
    fvu: dict[str, float] = {}
    last = names[-1]

    def report(e: ProgressEvent) -> None:
        if "fvu" in e.info:
            fvu[e.task] = float(e.info["fvu"])
        if e.task != last:
            return
        stats = e.stats
        if fvu:
            worst = max(fvu, key=lambda k: fvu[k])
            rate = f"  {e.info['tok_s']:,.0f} tok/s" if "tok_s" in e.info else ""
            stats = f"FVU mean {sum(fvu.values()) / len(fvu):.3f}, worst {fvu[worst]:.3f} ({worst}){rate}"
        progress(ProgressEvent(task=f"transcoders ×{len(names)}", done=e.done, total=e.total, unit=e.unit,
                               stats=stats, finished=e.finished, info={"fvu": dict(fvu), **e.info}))  # fmt: skip

    return report


@torch.no_grad()
def evaluate_set(
    model: Model, tcs: TranscoderSet, corpus: str, tokens: int = 8192, context: int = 128, skip_tokens: int = 0,
    batch: int = 8,
) -> dict[str, Any]:  # fmt: skip
    """Per-layer FVU on held-out text, and the CE loss with every MLP the set covers replaced at once."""
    ids, special = eval_contexts(model, corpus, tokens, context, skip_tokens=skip_tokens)
    keep = ~special.bool()
    fvu = {i: FVUAccumulator() for i in tcs.layers}
    sums = {"ce_clean": 0.0, "ce_spliced": 0.0, "ce_zero": 0.0, "kl_spliced": 0.0}
    hooks = [f"blocks.{i}.{k}" for i in tcs.layers for k in ("mlp_in", "mlp_out")]
    n = 0
    for s in range(0, ids.shape[0], batch):
        b, kb = ids[s : s + batch], keep[s : s + batch]
        with model.capture(hooks, stop_early=False) as acts:
            clean = model(b)
        assert clean is not None
        for i in tcs.layers:
            t = tcs[i]
            x, y = acts[f"blocks.{i}.mlp_in"][kb].float(), acts[f"blocks.{i}.mlp_out"][kb].float()
            fvu[i].update(y, t(x)[0])
        spliced = _spliced(model, tcs, b, kb)
        zero = _spliced(model, tcs, b, kb, zero=True)
        sums["ce_clean"] += float(next_token_ce(clean, b))
        sums["ce_spliced"] += float(next_token_ce(spliced, b))
        sums["ce_zero"] += float(next_token_ce(zero, b))
        sums["kl_spliced"] += float(next_token_kl(clean, spliced))
        n += 1
    out: dict[str, Any] = {k: v / n for k, v in sums.items()}
    gap = out["ce_zero"] - out["ce_clean"]
    out["ce_recovered"] = (out["ce_zero"] - out["ce_spliced"]) / gap if gap else math.nan
    out["fvu"] = {str(i): float(acc.value()) for i, acc in fvu.items()}
    out["tokens"] = int(ids.numel())
    return out


def _spliced(model: Model, tcs: TranscoderSet, ids: Tensor, keep: Tensor, zero: bool = False) -> Tensor:
    """Logits with every covered MLP's output replaced (by its transcoder on the spliced model's own MLP input,
    or by zeros); special-token positions keep the model's own output, as in `lmscope eval`."""
    seen: dict[int, Tensor] = {}

    def read(i: int) -> Callable[[Tensor], None]:
        def r(x: Tensor) -> None:
            seen[i] = x

        return r

    def write(i: int) -> Callable[[Tensor], Tensor]:
        def w(y: Tensor) -> Tensor:
            new = torch.zeros_like(y) if zero else tcs[i](seen[i].float())[0].to(y.dtype)
            return torch.where(keep.unsqueeze(-1).to(y.device), new, y)

        return w

    with contextlib.ExitStack() as stack:
        for i in tcs.layers:
            p = model.resolve(f"blocks.{i}.mlp_in")
            stack.enter_context(model.on_module(p.module, p.io, reader=read(i)))
        stack.enter_context(model.intervene({f"blocks.{i}.mlp_out": write(i) for i in tcs.layers}))
        out = model(ids)
    assert out is not None
    return out
