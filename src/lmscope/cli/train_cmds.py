"""`lmscope train`: train one or a sweep of sparse dictionaries on harvested activations."""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path
from typing import Annotated, Any

import typer

from lmscope.activations.sources import StoreSource
from lmscope.cli.common import console, handles_errors, parse_count
from lmscope.cli.progress import RichProgress
from lmscope.dictionaries import DictConfig, architecture, architectures
from lmscope.dictionaries.base import DictionaryError
from lmscope.training import RunSpec, TrainConfig, Trainer
from lmscope.training import distributed as ddp


def parse_list(text: str, kind: type = float) -> list[Any]:
    """'16,32,64' -> [16, 32, 64] (a sweep axis)."""
    try:
        return [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise DictionaryError(f"cannot read {text!r} as a comma-separated list of {kind.__name__}") from None


_CONFIG_DEFAULTS: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(DictConfig)}


def sweep_configs(
    arch: str,
    hooks: list[str],
    widths: dict[str, int],
    ks: list[int],
    expansions: list[float],
    l1s: list[float],
    l0s: list[float],
    hook_out: str | None = None,
    model: str | None = None,
    target_l0s: list[float] | None = None,
    groups: list[float] | None = None,
    token_topk_frac: float | None = None,
) -> list[DictConfig]:
    """The cross product of the sweep axes: one config per (hook, expansion, k, sparsity coefficient or target L0).

    The architecture names the DictConfig field it varies (`Dictionary.sparsity_param`); each such field has
    its command-line list here (--k, --l1, --l0); an empty list means the default. `target_l0s` (--target-l0) sweeps
    target L0s instead of the coefficient, which must then not be given as well. `groups`: matryoshka groups.
    `token_topk_frac` (--topk-phase): the TopK phase (batchtopk, matryoshka, jumprelu, relu); None: the default.
    """
    if arch not in architectures():
        raise DictionaryError(f"unknown --arch {arch!r}; choose one of {', '.join(architectures())}")
    flags = {"k": "--k", "l1_coeff": "--l1", "l0_coeff": "--l0"}
    axes: dict[str, list[Any]] = {"k": ks, "l1_coeff": l1s, "l0_coeff": l0s}
    key = architecture(arch).sparsity_param
    if key not in axes:
        raise DictionaryError(f"--arch {arch} varies {key!r}, which `lmscope train` has no option for")
    cast = type(_CONFIG_DEFAULTS[key])  # int for k, float for the coefficients
    values: list[Any] = axes[key] or [_CONFIG_DEFAULTS[key]]
    field = key
    if target_l0s:
        coeff = architecture(arch).controlled_coeff
        if coeff is None:
            raise DictionaryError(
                f"--target-l0 is for architectures whose sparsity is a penalty coefficient; --arch {arch} sets its L0 "
                f"with {flags[key]}"
            )
        if axes[coeff]:
            raise DictionaryError(
                f"both {flags[coeff]} and --target-l0 given: give the coefficient (kept fixed) or the target L0 (the "
                "coefficient is then adjusted during training, starting low), not both"
            )
        values, field, cast = target_l0s, "target_l0", float
    extra: dict[str, Any] = {"matryoshka_groups": list(groups)} if groups else {}
    if key != "k" and architecture(arch).has_topk_phase and ks:  # --k: the TopK phase's k (when no target L0 is set)
        if len(ks) > 1:
            raise DictionaryError(
                f"--k {','.join(map(str, ks))}: for --arch {arch} k is only its TopK phase's k, one value; sweep "
                f"{flags[key]} or --target-l0 instead"
            )
        extra["k"] = int(ks[0])
    if token_topk_frac is not None:
        if not architecture(arch).has_topk_phase:
            with_phase = ", ".join(a for a in architectures() if architecture(a).has_topk_phase)
            raise DictionaryError(f"--topk-phase is the TopK phase of {with_phase}; --arch {arch} has none")
        extra["token_topk_frac"] = float(token_topk_frac)
    out = []
    for hook, expansion, value in itertools.product(hooks, expansions, values):
        d_in = widths[hook]
        d_out = widths[hook_out] if hook_out else None
        out.append(
            DictConfig(
                arch=arch,
                d_in=d_in,
                d_sae=round(d_in * expansion),
                d_out=d_out,
                hook=hook,
                hook_out=hook_out,
                model=model,
                **extra,
                **{field: cast(value)},
            )
        )
    return out


def register(app: typer.Typer) -> None:
    @app.command(
        epilog="Examples:\n\n"
        "  lmscope train --acts acts/ --arch topk --k 32 --expansion 8 --tokens 20M --out dicts/\n\n"
        "  lmscope train --acts acts/ --arch topk --k 16,32,64 --tokens 50M --out sweep/   (3 dictionaries, 1 pass)\n\n"
        "  lmscope train --acts acts/ --arch relu --target-l0 32 --tokens 20M --out dicts/   (L1 adjusted to L0 32)\n\n"
        "  lmscope train --acts acts/ --arch matryoshka --k 32 --tokens 20M --out dicts/   (nested prefixes)\n\n"
        "  lmscope train --acts acts/ --hook blocks.6.mlp_in --hook-out blocks.6.mlp_out --out tc/   (a transcoder)\n\n"
        "  torchrun --nproc_per_node 4 -m lmscope.cli.app train --acts acts/ --out dicts/   (data parallel)"
    )
    @handles_errors
    def train(
        acts: Annotated[Path, typer.Option(help="A harvest directory written by `lmscope harvest`.")],
        out: Annotated[Path, typer.Option(help="Output directory: one sub-folder per dictionary, checkpoint, log.")],
        arch: Annotated[str, typer.Option(help=f"One of {', '.join(architectures())}.")] = "topk",
        hook: Annotated[str, typer.Option(help="Input hook(s), comma-separated (default: the store's first).")] = "",
        hook_out: Annotated[str, typer.Option(help="Target hook: trains transcoders hook -> hook_out.")] = "",
        k: Annotated[
            str,
            typer.Option(help="TopK/BatchTopK active latents; a list sweeps. ReLU/JumpReLU: their TopK phase's k."),
        ] = "32",
        expansion: Annotated[str, typer.Option(help="d_sae / d_in; a list sweeps.")] = "8",
        l1: Annotated[str, typer.Option(help="ReLU L1 coefficient (default 5); a list sweeps.")] = "",
        l0: Annotated[str, typer.Option(help="JumpReLU L0 coefficient (default 0.001); a list sweeps.")] = "",
        target_l0: Annotated[
            str, typer.Option(help="ReLU/JumpReLU: the L0 to reach (the coefficient is adjusted); a list sweeps.")
        ] = "",
        matryoshka_groups: Annotated[
            str, typer.Option(help="Matryoshka groups: fractions of d_sae or counts (default 1/16,1/16,1/8,1/4,1/2).")
        ] = "",
        topk_phase: Annotated[
            float | None,
            typer.Option(
                help="BatchTopK/Matryoshka/JumpReLU/ReLU: fraction of training that keeps each token's top k before "
                "the architecture's own selection (default 0.75; JumpReLU and ReLU 0.875; 0: no TopK phase)."
            ),
        ] = None,
        tokens: Annotated[str, typer.Option(help="Training tokens, e.g. 20M.")] = "20M",
        batch_size: Annotated[int, typer.Option(help="Global batch in tokens (split over DDP ranks).")] = 4096,
        lr: Annotated[float | None, typer.Option(help="Peak LR (default: per architecture and width).")] = None,
        warmup_steps: Annotated[int, typer.Option(help="Linear LR warmup steps.")] = 1000,
        b_dec_init: Annotated[str, typer.Option(help="geometric_median, mean or zeros.")] = "geometric_median",
        dead_window: Annotated[str, typer.Option(help="Tokens without firing before a latent counts as dead.")] = "10M",
        checkpoint_every: Annotated[int, typer.Option(help="Steps between checkpoints (0: only at the end).")] = 1000,
        epochs: Annotated[int, typer.Option(help="Passes over the store (if --tokens needs more than one).")] = 1,
        seed: Annotated[int, typer.Option(help="Seed of the initialisation and the shuffle.")] = 0,
        device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N.")] = "auto",
        wandb: Annotated[str, typer.Option(help="Also log to this wandb project (needs wandb installed).")] = "",
        no_resume: Annotated[bool, typer.Option(help="Start afresh even if --out holds a checkpoint.")] = False,
        progress: Annotated[bool, typer.Option(help="Show a progress bar per dictionary.")] = True,
    ) -> None:
        """Train sparse dictionaries (SAEs or transcoders) on a harvest; resumes from --out's checkpoint."""
        dev = ddp.init_from_env(device)
        hooks = [h for h in hook.split(",") if h]
        source = StoreSource(acts, hooks + ([hook_out] if hook_out else []) or None, batch_size, seed, epochs)
        hooks = hooks or [next(iter(source.widths))]
        configs = sweep_configs(
            arch, hooks, source.widths, parse_list(k, int), parse_list(expansion), parse_list(l1), parse_list(l0),
            hook_out or None, source.model, parse_list(target_l0), parse_list(matryoshka_groups), topk_phase,
        )  # fmt: skip
        tc = TrainConfig(
            total_tokens=parse_count(tokens), warmup_steps=warmup_steps, b_dec_init=b_dec_init,
            dead_window_tokens=parse_count(dead_window), checkpoint_every=checkpoint_every, seed=seed,
            wandb_project=wandb or None,
        )  # fmt: skip
        trainer = Trainer([RunSpec(c, lr=lr) for c in configs], tc, out, device=dev)
        with RichProgress(enabled=progress and ddp.is_main()) as bar:
            results = trainer.fit(source, resume=not no_resume, progress=bar)
        if ddp.is_main():
            for name, d in results.items():
                meta: dict[str, Any] = getattr(d, "metadata", {})
                health = meta.get("training", {}).get("health", {}).get("line", "ok")
                console.print(f"saved {out / name}  health: {health}", markup=False, highlight=False)
