"""Ground-truth recovery: every lmscope architecture trained on planted features at equal samples (JSON).

    .venv/bin/python benchmarks/recovery.py [--samples 524288] [--scenarios ratio2,ratio4,ratio10,toy4]
                                            [--archs topk,batchtopk,relu,jumprelu,matryoshka] [--d 64] [--threads 1]

Each scenario is a `lmscope.synthetic.data.GroundTruthConfig`: d=64 dimensions, 4 active features per sample on
average, power-law frequencies (alpha 1), 8 hierarchies of 2 children, 8 correlated and 8 anti-correlated pairs,
magnitudes 0.5 + U[0, 1), an offset of norm 2 and noise of norm 0.05, at superposition ratios 2, 4 and 10, and
(toy4) the hidden activations of a toy model of superposition at ratio 4; `hier` (not run by default) has 16
hierarchies of 4 children that fire with their parent 90% of the time, for absorption. In each scenario every
architecture trains on the same samples (one Trainer, one pass; dictionary width = the number of true features,
lr 4e-3, k = 4, L1 2, L0 3) and is scored on 8,192 fresh samples by `lmscope.synthetic.recovery`: MMCS, the
fraction of true features recovered at cosine > 0.9 (overall and per frequency decile), absorption and splitting on
the hierarchies, FVU, L0 and dead latents. The library function is `lmscope.synthetic.benchmark.run_recovery`.

Prints a table and writes benchmarks/results/recovery.json. Default sizes take a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

import lmscope
from lmscope.core.atomic import atomic_write_json
from lmscope.dictionaries import architectures
from lmscope.synthetic.benchmark import RecoveryBenchConfig, dictionary_configs, run_recovery
from lmscope.synthetic.data import GroundTruthConfig

ROOT = Path(__file__).resolve().parent

BASE = GroundTruthConfig(
    d=64, ratio=4.0, active=4.0, alpha=1.0, hierarchies=8, children=2, child_prob=0.5, correlated_pairs=8,
    anticorrelated_pairs=8, correlation=0.7, magnitude_offset=0.5, magnitude_spread=1.0, offset=2.0, noise=0.05,
)  # fmt: skip
SCENARIOS: dict[str, dict[str, Any]] = {
    "ratio2": {"ratio": 2.0},
    "ratio4": {"ratio": 4.0},
    "ratio10": {"ratio": 10.0},
    "toy4": {"ratio": 4.0, "source": "toy"},
    # not run by default: hierarchies everywhere (16 parents of 4 children, a child with its parent 90% of the time),
    # the setting where absorption pays most (Matryoshka against BatchTopK and TopK: docs/superposition.md)
    "hier": {"ratio": 4.0, "hierarchies": 16, "children": 4, "child_prob": 0.9},
}
DEFAULT_SCENARIOS = ("ratio2", "ratio4", "ratio10", "toy4")
HEADLINE = ("mmcs", "recovered", "fvu", "l0", "dead_frac", "absorption", "split_frac")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=524_288, help="training samples per scenario (all dictionaries)")
    p.add_argument("--eval-samples", type=int, default=8192)
    p.add_argument("--scenarios", default=",".join(DEFAULT_SCENARIOS), help=f"comma-separated: {', '.join(SCENARIOS)}")
    p.add_argument("--archs", default=",".join(architectures()))
    p.add_argument("--d", type=int, default=BASE.d)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--lr", type=float, default=4e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="1 is fastest for these small matrices")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "recovery.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    names = [s for s in args.scenarios.split(",") if s]
    unknown = [s for s in names if s not in SCENARIOS]
    if unknown:
        sys.exit(f"unknown scenario(s) {unknown}; choose from {', '.join(SCENARIOS)}")
    archs = [a for a in args.archs.split(",") if a]

    results: dict[str, Any] = {}
    rows = []
    for name in names:
        data = dataclasses.replace(BASE, d=args.d, seed=args.seed, **SCENARIOS[name])
        cfg = RecoveryBenchConfig(
            data=data, train_samples=args.samples, eval_samples=args.eval_samples, batch_size=args.batch,
            lr=args.lr, seed=args.seed,
        )  # fmt: skip
        t0 = time.perf_counter()
        result = run_recovery(cfg, dictionary_configs(cfg, archs))
        seconds = time.perf_counter() - t0
        results[name] = {**result.to_dict(), "seconds": seconds}
        for run, report in result.reports.items():
            rows.append((name, result.archs[run], report))
        print(f"{name}: {data.n_features} features in {data.d} dims, {args.samples:,} samples, {seconds:.1f} s",
              flush=True)  # fmt: skip

    summary = {
        scenario: {arch: {k: getattr(r, k) for k in HEADLINE} for s, arch, r in rows if s == scenario}
        for scenario in names
    }
    out: dict[str, Any] = {
        "benchmark": "recovery",
        "samples": args.samples,
        "eval_samples": args.eval_samples,
        "batch": args.batch,
        "lr": args.lr,
        "archs": archs,
        "summary": summary,
        "scenarios": results,
        "lmscope_version": lmscope.__version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, out)

    print(f"{'scenario':9s} {'arch':10s} {'MMCS':>6s} {'recov':>6s} {'FVU':>6s} {'L0':>5s} {'dead':>6s} "
          f"{'absorb':>7s} {'split':>6s}  recovered per frequency decile (D0 most frequent)")  # fmt: skip
    for scenario, arch, r in rows:
        absorb = "-" if r.absorption is None else f"{r.absorption:.2f}"
        split = "-" if r.split_frac is None else f"{r.split_frac:.2f}"
        fvu = "-" if r.fvu is None else f"{r.fvu:.3f}"
        deciles = " ".join(f"{d['recovered']:.2f}" for d in r.deciles)
        print(f"{scenario:9s} {arch:10s} {r.mmcs:6.3f} {r.recovered:6.3f} {fvu:>6s} {r.l0:5.1f} {r.dead_frac:6.3f} "
              f"{absorb:>7s} {split:>6s}  {deciles}")  # fmt: skip
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
