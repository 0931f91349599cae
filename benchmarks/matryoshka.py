"""Matryoshka against BatchTopK and TopK on the recovery benchmark's hierarchies: absorption at equal samples (JSON).

    .venv/bin/python benchmarks/matryoshka.py [--samples 524288] [--seeds 0,1,2] [--scenarios hier,ratio4]
                                              [--archs topk,batchtopk,matryoshka] [--threads 1]

The scenarios are benchmarks/recovery.py's (`hier`: 16 parents of 4 children, a child firing with its parent 90% of
the time; `ratio4`: 8 parents of 2 children, 50%), at several seeds (each seed draws another truth, other samples and
another initialisation). In each scenario and seed every architecture trains on the same samples (one Trainer, one
pass, width = the number of true features, k = 4, lr 4e-3) and is scored on 8,192 fresh samples. Besides
recovery.py's figures it records how many parents the absorption score could count (a latent within cosine 0.5 of
the parent) and their mean cosine, since absorption is averaged over those parents only; the summary gives each
figure's mean, min and max over the seeds.

Prints a table and writes benchmarks/results/matryoshka.json. About three minutes per seed on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from _runinfo import run_info
from lmscope.core.atomic import atomic_write_json
from lmscope.synthetic.benchmark import RecoveryBenchConfig, dictionary_configs, run_recovery
from lmscope.synthetic.recovery import RecoveryReport, ScoreSettings

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
from recovery import BASE, SCENARIOS  # noqa: E402  (the recovery benchmark's scenarios, one definition)

FIGURES = ("mmcs", "recovered", "fvu", "l0", "dead_frac", "absorption", "split_frac", "parents_counted", "parent_cos")


def figures(report: RecoveryReport) -> dict[str, float | None]:
    counted = [h for h in report.hierarchies if h.samples_with_child > 0 and h.parent_cos >= ScoreSettings.parent_cos]
    return {
        "mmcs": report.mmcs, "recovered": report.recovered, "fvu": report.fvu, "l0": report.l0,
        "dead_frac": report.dead_frac, "absorption": report.absorption, "split_frac": report.split_frac,
        "parents_counted": float(len(counted)),
        "parent_cos": statistics.mean(h.parent_cos for h in report.hierarchies) if report.hierarchies else None,
    }  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=524_288)
    p.add_argument("--eval-samples", type=int, default=8192)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--scenarios", default="hier,ratio4")
    p.add_argument("--archs", default="topk,batchtopk,matryoshka")
    p.add_argument("--lr", type=float, default=4e-3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=ROOT / "results" / "matryoshka.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",") if s]
    names = [s for s in args.scenarios.split(",") if s]
    archs = [a for a in args.archs.split(",") if a]
    unknown = [s for s in names if s not in SCENARIOS]
    if unknown:
        sys.exit(f"unknown scenario(s) {unknown}; choose from {', '.join(SCENARIOS)}")

    runs: list[dict[str, Any]] = []
    for name in names:
        for seed in seeds:
            data = dataclasses.replace(BASE, seed=seed, **SCENARIOS[name])
            cfg = RecoveryBenchConfig(
                data=data, train_samples=args.samples, eval_samples=args.eval_samples, lr=args.lr, seed=seed
            )
            t0 = time.perf_counter()
            result = run_recovery(cfg, dictionary_configs(cfg, archs))
            for run, report in result.reports.items():
                runs.append({"scenario": name, "seed": seed, "arch": result.archs[run], **figures(report)})
            print(f"{name} seed {seed}: {time.perf_counter() - t0:.1f} s", flush=True)

    summary: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
    for name in names:
        summary[name] = {}
        for arch in archs:
            rows = [r for r in runs if r["scenario"] == name and r["arch"] == arch]
            summary[name][arch] = {
                k: {"mean": statistics.mean(v), "min": min(v), "max": max(v)}
                for k in FIGURES
                if (v := [r[k] for r in rows if r[k] is not None])
            }
    out = {
        "benchmark": "matryoshka",
        "samples": args.samples,
        "eval_samples": args.eval_samples,
        "seeds": seeds,
        "archs": archs,
        "scenarios": {n: dataclasses.asdict(dataclasses.replace(BASE, **SCENARIOS[n])) for n in names},
        "summary": summary,
        "runs": runs,
        **run_info(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, out)

    print(f"{'scenario':9s} {'arch':10s} " + " ".join(f"{k:>15s}" for k in FIGURES))
    for name in names:
        for arch in archs:
            cells = []
            for k in FIGURES:
                f = summary[name][arch].get(k)
                cells.append(f"{f['mean']:.3f} ({f['min']:.2f}-{f['max']:.2f})" if f else "-")
            print(f"{name:9s} {arch:10s} " + " ".join(f"{c:>15s}" for c in cells))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
