"""`lmscope toy`: toy models of superposition (phase, dims, transition) and the ground-truth recovery benchmark."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from lmscope.cli.common import console, handles_errors
from lmscope.cli.progress import RichProgress
from lmscope.errors import LmscopeError
from lmscope.model.device import resolve_device
from lmscope.synthetic.benchmark import RecoveryBenchConfig, dictionary_configs, run_recovery
from lmscope.synthetic.data import GroundTruthConfig
from lmscope.synthetic.experiments import (
    DimsConfig,
    PhaseConfig,
    TransitionConfig,
    dimensionality,
    log_grid,
    phase_diagram,
    transition,
)
from lmscope.synthetic.toy import PHASES, ToyConfig

toy_app = typer.Typer(
    name="toy",
    help="Toy models of superposition (Elhage et al. 2022) and the ground-truth recovery benchmark. "
    "Figures are written to --out as offline HTML and JSON (PNG too when kaleido is installed).",
    no_args_is_help=True,
)

OutOpt = Annotated[Path, typer.Option("--out", help="Directory for the figures (HTML, JSON, PNG).")]
StepsOpt = Annotated[int, typer.Option("--steps", help="Training steps of each toy model.")]
RestartsOpt = Annotated[int, typer.Option("--restarts", help="Initialisations per setting; the best is kept.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed of the initialisations and the data.")]
ToyDeviceOpt = Annotated[str, typer.Option("--device", help="cpu (fastest for these tiny models), auto, cuda, mps.")]
DEFAULT_SPARSITIES = "0,0.7,0.9,0.97,0.99,0.997"
ProgressOpt = Annotated[bool, typer.Option("--progress/--no-progress", help="Show progress bars.")]


def register(app: typer.Typer) -> None:
    app.add_typer(toy_app, name="toy")


def _floats(text: str, what: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise LmscopeError(f"cannot read {what} {text!r}; give comma-separated numbers, e.g. 0,0.9,0.99") from None


def _wrote(paths: list[Path]) -> None:
    for p in paths:
        console.print(f"wrote {p}")


@toy_app.command(
    "phase",
    epilog="Examples:\n\n"
    "  lmscope toy phase --out toy/                          (2 features in 1 dimension, an 8 × 8 grid)\n\n"
    "  lmscope toy phase --features 3 --hidden 2 --grid 6 --out toy3/",
)
@handles_errors
def phase(
    out: OutOpt = Path("toy"),
    features: Annotated[int, typer.Option(help="Features n (the last is the extra one).")] = 2,
    hidden: Annotated[int, typer.Option(help="Hidden dimensions m.")] = 1,
    grid: Annotated[int, typer.Option(help="Points per axis (importance 0.1–10 × density 1–0.01).")] = 8,
    steps: StepsOpt = 2000,
    restarts: RestartsOpt = 8,
    seed: SeedOpt = 0,
    device: ToyDeviceOpt = "cpu",
    progress: ProgressOpt = True,
) -> None:
    """The phase diagram: the extra feature is not represented, dedicated, or superposed."""
    from lmscope.synthetic.plots import phase_figure, write_figure

    toy = ToyConfig(n_features=features, d_hidden=hidden, steps=steps, restarts=restarts, seed=seed)
    cfg = PhaseConfig(toy=toy, grid=grid)
    with RichProgress(enabled=progress) as bar:
        result = phase_diagram(cfg, bar, device=resolve_device(device))
    letter = {p: p[0].upper() for p in PHASES}  # N, D, S
    table = Table(title="extra feature's phase (N not represented, D dedicated, S superposed)")
    table.add_column("density \\ importance")
    for r in result.importances:
        table.add_column(f"{r:.2g}", justify="center")
    for dens, row in zip(result.densities, result.phase, strict=True):
        table.add_row(f"{dens:.3g}", *[letter[p] for p in row])
    console.print(table)
    console.print("counts: " + ", ".join(f"{k} {v}" for k, v in sorted(result.counts().items())))
    _wrote(write_figure(phase_figure(result), out, "phase", result.to_dict()))


@toy_app.command(
    "dims",
    epilog="Examples:\n\n"
    "  lmscope toy dims --out toy/                 (digon 1/2, triangle 2/3, pentagon 2/5, and a 12-in-4 sweep)\n\n"
    "  lmscope toy dims --features 40 --hidden 10 --steps 4000 --out toy-big/",
)
@handles_errors
def dims(
    out: OutOpt = Path("toy"),
    features: Annotated[int, typer.Option(help="Features of the sparsity sweep's model.")] = 12,
    hidden: Annotated[int, typer.Option(help="Hidden dimensions of the sweep's model.")] = 4,
    points: Annotated[int, typer.Option(help="Densities in the sweep (1 to 0.01, log-spaced; 0: no sweep).")] = 8,
    steps: StepsOpt = 2000,
    restarts: RestartsOpt = 6,
    seed: SeedOpt = 0,
    device: ToyDeviceOpt = "cpu",
    progress: ProgressOpt = True,
) -> None:
    """Feature dimensionality: the fractions 1/2, 2/3, 2/5 of digons, triangles and pentagons."""
    from lmscope.synthetic.plots import dims_figure, write_figure

    if points < 0:
        raise LmscopeError(f"--points {points} is out of range; give 0 (no sweep) or more densities")
    toy = ToyConfig(n_features=features, d_hidden=hidden, steps=steps, restarts=restarts, seed=seed)
    cfg = DimsConfig(toy=toy, sweep_densities=tuple(log_grid(1.0, 0.01, points)) if points else ())
    with RichProgress(enabled=progress) as bar:
        result = dimensionality(cfg, bar, device=resolve_device(device))
    table = Table(title="polytopes (mean dimensionality of the represented features)")
    for col in ("polytope", "n in m", "sparsity", "represented", "measured D", "expected", "nearest"):
        table.add_column(col)
    for p in result.polytopes:
        q = p.polytope
        table.add_row(q.name, f"{q.n_features} in {q.d_hidden}", f"{q.sparsity:g}", str(p.represented),
                      f"{p.mean_dimensionality:.3f}", f"{q.expected:.3f}", p.nearest)  # fmt: skip
    console.print(table)
    if result.sweep:
        sweep = Table(title=f"sweep: {features} features in {hidden} dimensions")
        for col in ("density", "represented", "dims per feature", "D_i of the represented features"):
            sweep.add_column(col)
        for point in result.to_dict()["sweep"]["points"]:
            ds = " ".join(f"{v:.2f}" for v in sorted(point["dimensionality"]))
            sweep.add_row(f"{point['density']:.3g}", str(point["represented"]), f"{point['dims_per_feature']:.3f}", ds)
        console.print(sweep)
    _wrote(write_figure(dims_figure(result), out, "dims", result.to_dict()))


@toy_app.command(
    "transition",
    epilog="Examples:\n\n"
    "  lmscope toy transition --out toy/          (20 features, importance 0.7^i, in 5 dimensions)\n\n"
    "  lmscope toy transition --features 5 --hidden 2 --decay 0.9 --sparsities 0,0.8,0.9 --out toy5/",
)
@handles_errors
def transition_cmd(
    out: OutOpt = Path("toy"),
    features: Annotated[int, typer.Option(help="Features n.")] = 20,
    hidden: Annotated[int, typer.Option(help="Hidden dimensions m.")] = 5,
    decay: Annotated[float, typer.Option(help="Feature i has importance decay^i.")] = 0.7,
    sparsities: Annotated[str, typer.Option(help="Comma-separated sparsities S in [0, 1).")] = DEFAULT_SPARSITIES,
    steps: StepsOpt = 3000,
    restarts: RestartsOpt = 3,
    seed: SeedOpt = 0,
    device: ToyDeviceOpt = "cpu",
    progress: ProgressOpt = True,
) -> None:
    """The transition into superposition as sparsity grows."""
    from lmscope.synthetic.plots import transition_figure, write_figure

    toy = ToyConfig(n_features=features, d_hidden=hidden, steps=steps, restarts=restarts, seed=seed)
    cfg = TransitionConfig(toy=toy, importance_decay=decay, sparsities=_floats(sparsities, "--sparsities"))
    with RichProgress(enabled=progress) as bar:
        result = transition(cfg, bar, device=resolve_device(device))
    table = Table(title=f"{features} features (importance {decay:g}^i) in {hidden} dimensions")
    for col in ("sparsity", "represented", "superposed", "dims per feature", "phases (feature 0 first)"):
        table.add_column(col)
    d = result.to_dict()
    for s, rep, sup, dpf, m in zip(d["sparsities"], d["represented"], d["superposed"], d["dims_per_feature"],
                                   result.models, strict=True):  # fmt: skip
        code = "".join({"not represented": ".", "dedicated": "D", "superposed": "S"}[p] for p in m.phases())
        table.add_row(f"{s:g}", str(rep), str(sup), f"{dpf:.3f}", code)
    console.print(table)
    _wrote(write_figure(transition_figure(result), out, "transition", d))


@toy_app.command(
    "recovery",
    epilog="Examples:\n\n"
    "  lmscope toy recovery --out rec/                            (every architecture, 64 dims, ratio 4)\n\n"
    "  lmscope toy recovery --arch topk --k 4 --ratio 8 --hierarchies 8 --samples 262144 --out rec8/\n\n"
    "  lmscope toy recovery --source toy --ratio 2 --out rec-toy/   (a toy model's hidden activations)",
)
@handles_errors
def recovery(
    out: OutOpt = Path("recovery"),
    arch: Annotated[str, typer.Option(help="Architectures, comma-separated, or all.")] = "all",
    d: Annotated[int, typer.Option(help="Dimension of the activations.")] = 64,
    ratio: Annotated[float, typer.Option(help="Superposition ratio: true features / d.")] = 4.0,
    active: Annotated[float, typer.Option(help="Mean active true features per sample.")] = 4.0,
    alpha: Annotated[float, typer.Option(help="Power-law exponent of the feature frequencies.")] = 1.0,
    hierarchies: Annotated[int, typer.Option(help="Parent features with children firing only with them.")] = 8,
    children: Annotated[int, typer.Option(help="Children per parent.")] = 2,
    correlated: Annotated[int, typer.Option(help="Positively correlated feature pairs.")] = 8,
    anticorrelated: Annotated[int, typer.Option(help="Anti-correlated feature pairs.")] = 8,
    offset: Annotated[float, typer.Option(help="Norm of a constant offset added to every sample.")] = 2.0,
    noise: Annotated[float, typer.Option(help="Expected norm of the Gaussian noise.")] = 0.05,
    source: Annotated[str, typer.Option(help="random directions, or toy (a toy model's hidden activations).")] = (
        "random"
    ),
    samples: Annotated[int, typer.Option(help="Training samples (the same for every dictionary).")] = 524288,
    expansion: Annotated[float, typer.Option(help="Dictionary width / true features.")] = 1.0,
    k: Annotated[int | None, typer.Option(help="TopK/BatchTopK k (default: the truth's mean L0).")] = None,
    l1: Annotated[float, typer.Option(help="ReLU L1 coefficient.")] = 2.0,
    l0: Annotated[float, typer.Option(help="JumpReLU L0 coefficient.")] = 3.0,
    target_l0: Annotated[
        float | None, typer.Option(help="ReLU/JumpReLU: aim at this L0 (starting from 1/20 of --l1 / --l0).")
    ] = None,
    lr: Annotated[float, typer.Option(help="Peak learning rate of every dictionary.")] = 4e-3,
    seed: SeedOpt = 0,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N, mps.")] = "auto",
    progress: ProgressOpt = True,
) -> None:
    """Train dictionaries on planted ground truth and score how many true features each recovers."""
    from lmscope.core.atomic import atomic_write_json
    from lmscope.synthetic.plots import recovery_figure, write_figure

    data = GroundTruthConfig(
        d=d, ratio=ratio, active=active, alpha=alpha, hierarchies=hierarchies, children=children,
        correlated_pairs=correlated, anticorrelated_pairs=anticorrelated, offset=offset, noise=noise, source=source,
        seed=seed,
    )  # fmt: skip
    cfg = RecoveryBenchConfig(data=data, train_samples=samples, expansion=expansion, lr=lr, seed=seed)
    archs = None if arch == "all" else [a.strip() for a in arch.split(",") if a.strip()]
    runs = dictionary_configs(cfg, archs, k=k, l1_coeff=l1, l0_coeff=l0, target_l0=target_l0)
    with RichProgress(enabled=progress) as bar:
        result = run_recovery(cfg, runs, bar, device=str(resolve_device(device)))
    table = Table(title=f"recovery: {data.n_features} true features in {d} dims, {samples:,} training samples")
    for col in ("dictionary", "MMCS", "recovered", "FVU", "L0", "dead", "absorption", "split"):
        table.add_column(col, justify="right")
    for name, r in result.reports.items():
        table.add_row(
            name, f"{r.mmcs:.3f}", f"{r.recovered:.1%}", "-" if r.fvu is None else f"{r.fvu:.3f}", f"{r.l0:.1f}",
            f"{r.dead_frac:.1%}", "-" if r.absorption is None else f"{r.absorption:.1%}",
            "-" if r.split_frac is None else f"{r.split_frac:.0%}",
        )  # fmt: skip
    console.print(table)
    out.mkdir(parents=True, exist_ok=True)
    summary = result.to_dict()
    atomic_write_json(out / "recovery.json", summary, fsync=False)
    _wrote([out / "recovery.json"])
    title = f"Recovery at {samples:,} samples ({data.n_features} features in {d} dims, {source})"
    _wrote(write_figure(recovery_figure(result.reports, title), out, "recovery_deciles", summary))
