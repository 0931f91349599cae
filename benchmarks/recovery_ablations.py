"""Which change to lmscope's training recipe does what on the ground-truth recovery benchmark (JSON).

    .venv/bin/python benchmarks/recovery_ablations.py [--variants base,lr2e-3,...] [--scenarios ratio2,ratio10]
                                                      [--seeds 0,1] [--archs topk,...] [--jobs 2]

Every variant changes ONE thing from the benchmark's recipe (benchmarks/recovery.py: lr 4e-3, 20 warmup steps, decay
over the last 20%, geometric-median b_dec, mean-norm input scaling, gradient clipping at 1, AuxK 1/32 over d/2
latents, a latent dead after a quarter of training silent) and trains every architecture on the same samples as the
base recipe (same truth, seed and order). `--jobs` runs (variant, scenario, seed) jobs in parallel processes, one
thread each. For BatchTopK and Matryoshka it also scores each trained dictionary with its inference threshold
re-estimated after training (`calibrated`: the threshold at which the mean L0 on 16,384 training samples is k),
which changes L0, FVU, dead and absorption but not the decoder, so not MMCS.

Writes benchmarks/results/recovery_ablations.json: per job, per architecture, the headline figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from lmscope.core.atomic import atomic_write_json  # noqa: E402
from lmscope.dictionaries import architecture, architectures  # noqa: E402
from lmscope.synthetic.benchmark import RecoveryBenchConfig, dictionary_configs, run_recovery  # noqa: E402
from lmscope.synthetic.recovery import score_dictionary  # noqa: E402
from lmscope.training import RunSpec  # noqa: E402
from recovery import BASE, HEADLINE, SCENARIOS  # noqa: E402

# name -> (RecoveryBenchConfig changes, DictConfig changes)
VARIANTS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "base": ({}, {}),
    "lr2e-3": ({"lr": 2e-3}, {}),
    "lr8e-3": ({"lr": 8e-3}, {}),
    "warmup0": ({"warmup_steps": 0}, {}),
    "warmup100": ({"warmup_steps": 100}, {}),
    "decay_all": ({"train_options": {"decay_frac": 1.0}}, {}),
    "decay_none": ({"train_options": {"decay_frac": 0.0}}, {}),
    "bdec_mean": ({"train_options": {"b_dec_init": "mean"}}, {}),
    "bdec_zeros": ({"train_options": {"b_dec_init": "zeros"}}, {}),
    "no_norm": ({"train_options": {"normalize": False}}, {}),
    "no_clip": ({"train_options": {"grad_clip": None}}, {}),
    "dead_1/16": ({"dead_window_frac": 1 / 16}, {}),
    "dead_1/64": ({"dead_window_frac": 1 / 64}, {}),
    "aux_1/8": ({}, {"aux_coeff": 1 / 8}),
    "aux_1": ({}, {"aux_coeff": 1.0}),
    "auxk_4d": ({}, {"aux_k": 256}),
    "dead_1/256": ({"dead_window_frac": 1 / 256}, {}),
    "dead_1/64+aux_1/8": ({"dead_window_frac": 1 / 64}, {"aux_coeff": 1 / 8}),
    "dead_1/64+aux_1": ({"dead_window_frac": 1 / 64}, {"aux_coeff": 1.0}),
    # batchtopk / matryoshka only: the TopK phase before the batch-level selection (the default is 3/4 of training)
    "token_topk_0": ({}, {"token_topk_frac": 0.0}),
    "token_topk_1/4": ({}, {"token_topk_frac": 0.25}),
    "token_topk_1/2": ({}, {"token_topk_frac": 0.5}),
    "token_topk_3/4": ({}, {"token_topk_frac": 0.75}),
    "token_topk_7/8": ({}, {"token_topk_frac": 0.875}),
    "token_topk_15/16": ({}, {"token_topk_frac": 0.9375}),
    # jumprelu only: its own knobs (the benchmark's are bandwidth 0.2, initial threshold 0.2, L0 coefficient 3)
    "jr_bw0.1": ({}, {"jumprelu_bandwidth": 0.1}),
    "jr_bw0.4": ({}, {"jumprelu_bandwidth": 0.4}),
    "jr_thr0.1": ({}, {"jumprelu_init_threshold": 0.1}),
    "jr_thr0.4": ({}, {"jumprelu_init_threshold": 0.4}),
    "jr_l0_1": ({}, {"l0_coeff": 1.0}),
    "jr_l0_10": ({}, {"l0_coeff": 10.0}),
    # relu / jumprelu only (a coefficient-controlled architecture): aim at L0 4 (the truth's) instead of L1 2 / L0 3
    "target_l0": ({}, {"target_l0": 4.0}),
    "target_l0_lr2e-3": ({"lr": 2e-3}, {"target_l0": 4.0}),
}


def calibrated_threshold(d: Any, x: torch.Tensor) -> float:
    """The threshold at which the dictionary's mean L0 on `x` is k (the k·N-th largest positive pre-activation)."""
    with torch.no_grad():
        pre = torch.relu(d.pre_acts(x)).flatten()
        return float(pre.topk(min(pre.numel(), int(d.cfg.k) * x.shape[0])).values[-1])


def job(spec: tuple[str, str, int, list[str], int]) -> dict[str, Any]:
    variant, scenario, seed, archs, samples = spec
    torch.set_num_threads(1)
    bench_changes, dict_changes = VARIANTS[variant]
    data = dataclasses.replace(BASE, seed=seed, **SCENARIOS[scenario])
    settings: dict[str, Any] = {"lr": 4e-3, **bench_changes}
    cfg = RecoveryBenchConfig(
        data=data, train_samples=samples, eval_samples=8192, batch_size=1024, seed=seed, **settings
    )
    configs = dictionary_configs(cfg, archs)
    if "target_l0" in dict_changes:
        configs = dictionary_configs(cfg, archs, target_l0=dict_changes["target_l0"])
        dict_changes = {k: v for k, v in dict_changes.items() if k != "target_l0"}
    def changed(c: Any) -> Any:  # a TopK-phase fraction only for the architectures that have the phase
        keep = {k: v for k, v in dict_changes.items() if k != "token_topk_frac" or architecture(c.arch).has_topk_phase}
        return dataclasses.replace(c, **keep)

    runs = [RunSpec(changed(c), lr=cfg.lr) for c in configs]
    t0 = time.perf_counter()
    result = run_recovery(cfg, runs)
    out: dict[str, Any] = {"variant": variant, "scenario": scenario, "seed": seed, "seconds": time.perf_counter() - t0}
    eval_samples = result.truth.sample(8192, seed=data.seed + 2)
    x_cal = result.truth.activations(16384, seed=data.seed + 1)  # the first training samples
    for name, r in result.reports.items():
        arch = result.archs[name]
        row = {k: getattr(r, k) for k in HEADLINE}
        row["deciles"] = [round(dc["recovered"], 3) for dc in r.deciles]
        d = result.dictionaries[name]
        if arch in ("batchtopk", "matryoshka"):
            theta = calibrated_threshold(d, x_cal)
            row["threshold"] = float(d.threshold)
            row["threshold_calibrated"] = theta
            d.threshold.fill_(theta)
            rc = score_dictionary(result.truth, d, eval_samples)
            row["calibrated"] = {k: getattr(rc, k) for k in HEADLINE}
        out[arch] = row
    print(f"{variant:12s} {scenario:8s} seed {seed}: " + "  ".join(
        f"{a} {out[a]['mmcs']:.3f}/{out[a]['dead_frac']:.2f}" for a in archs), flush=True)  # fmt: skip
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--scenarios", default="ratio2,ratio10")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--archs", default=",".join(architectures()))
    p.add_argument("--samples", type=int, default=524_288)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "results" / "recovery_ablations.json")
    args = p.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    bad = [v for v in variants if v not in VARIANTS] + [s for s in args.scenarios.split(",") if s not in SCENARIOS]
    if bad:
        sys.exit(f"unknown variant(s) or scenario(s) {bad}; variants: {', '.join(VARIANTS)}; scenarios: "
                 f"{', '.join(SCENARIOS)}")  # fmt: skip
    archs = [a for a in args.archs.split(",") if a]
    specs = [(v, s, int(seed), archs, args.samples) for seed in args.seeds.split(",") for s in args.scenarios.split(",")
             for v in variants]  # fmt: skip
    done: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    with mp.get_context("spawn").Pool(args.jobs) as pool:
        for res in pool.imap_unordered(job, specs):
            done.append(res)
            described = {v: [str(c) for c in VARIANTS[v]] for v in variants}
            atomic_write_json(args.out, {
                "benchmark": "recovery_ablations", "samples": args.samples, "variants": described, "jobs": done,
                "seconds": time.perf_counter() - t0, "torch": torch.__version__,
                "cpu_count": os.cpu_count(), "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
            })  # fmt: skip
    print(json.dumps({"wrote": str(args.out), "jobs": len(done), "seconds": round(time.perf_counter() - t0)}))


if __name__ == "__main__":
    main()
