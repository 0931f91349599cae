"""Ground-truth recovery: every lmscope architecture, and SAELens's and sparsify's trainers, on planted features at
equal samples (JSON).

    .venv/bin/python benchmarks/recovery.py [--samples 524288] [--scenarios ratio2,ratio4,ratio10,toy4]
                                            [--archs topk,batchtopk,relu,jumprelu,matryoshka] [--d 64] [--threads 1]
                                            [--libs lmscope,saelens,sparsify] [--anchor-recipes default,matched]

Each scenario is a `lmscope.synthetic.data.GroundTruthConfig`: d=64 dimensions, 4 active features per sample on
average, power-law frequencies (alpha 1), 8 hierarchies of 2 children, 8 correlated and 8 anti-correlated pairs,
magnitudes 0.5 + U[0, 1), an offset of norm 2 and noise of norm 0.05, at superposition ratios 2, 4 and 10, and
(toy4) the hidden activations of a toy model of superposition at ratio 4; `hier` (not run by default) has 16
hierarchies of 4 children that fire with their parent 90% of the time, for absorption. In each scenario every
architecture trains on the same samples (one Trainer, one pass; dictionary width = the number of true features,
lr 4e-3, k = 4, L1 2, L0 3) and is scored on 8,192 fresh samples by `lmscope.synthetic.recovery`: MMCS, the
fraction of true features recovered at cosine > 0.9 (overall and per frequency decile), absorption and splitting on
the hierarchies, FVU, L0 and dead latents. The library function is `lmscope.synthetic.benchmark.run_recovery`.

The anchors (`--libs`; benchmarks/anchors/recovery_train.py in benchmarks/.venv-anchors, built by
benchmarks/anchors_env.sh; skipped with one line when it is absent): SAELens's TopK and BatchTopK trainers and
sparsify's TopK, same width and k, trained on exactly the same samples in the same order (written once per scenario
to a safetensors file the subprocess memory-maps), one pass, batch 1024, each with the library's own defaults
(`default`) and with lmscope's LR, schedule, AuxK coefficient and dead window (`matched`); their decoders, latents
and reconstructions on the same scoring samples are scored by the same `lmscope.synthetic.recovery` function. One
anchor trains at a time, in parallel with lmscope's trainer.

Prints a table and writes benchmarks/results/recovery.json. Default sizes take a few minutes on 2 CPU cores
(about 2 more per scenario for the anchors).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

from _runinfo import run_info
from lmscope.core.atomic import atomic_write_json
from lmscope.dictionaries import architectures
from lmscope.synthetic.benchmark import RecoveryBenchConfig, dictionary_configs, run_recovery
from lmscope.synthetic.data import GroundTruth, GroundTruthConfig, Samples, generate
from lmscope.synthetic.recovery import RecoveryReport, score_latents

ROOT = Path(__file__).resolve().parent
ANCHORS_PY = ROOT / ".venv-anchors" / "bin" / "python"
ANCHOR_SCRIPT = ROOT / "anchors" / "recovery_train.py"
# (library, architecture) pairs the anchors' trainers offer simply; sparsify trains TopK only
ANCHOR_ARCHS = (("saelens", "topk"), ("saelens", "batchtopk"), ("sparsify", "topk"))
ANCHOR_RECIPES = ("default", "matched")

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


def anchor_problem(python: Path) -> str | None:
    """None when the anchors' environment can run, else the one line that says why not and how to build it."""
    if not Path(python).is_file():
        return f"anchors skipped: {python} is missing; build it with `bash benchmarks/anchors_env.sh` (about 2 GB)"
    return None


def write_rows(path: Path, x: torch.Tensor) -> None:
    """`x` [N, d] as a safetensors file holding one fp32 tensor "acts" (what the anchor scripts memory-map)."""
    sys.path.insert(0, str(ROOT))
    from anchors._common import write_acts

    write_acts(path, [x.float()], x.shape[0], x.shape[1])


def run_anchor(lib: str, arch: str, recipe: str, files: dict[str, Path], d_sae: int, k: int,
               args: argparse.Namespace) -> dict[str, Any]:  # fmt: skip
    """Train one anchor in the anchors' venv; its decoder, latents and reconstructions come back in a file."""
    out = files["dir"] / f"{lib}-{arch}-{recipe}.safetensors"
    lm = RecoveryBenchConfig()  # lmscope's warmup and dead window, for the matched recipe
    window = max(args.batch, round(args.samples * lm.dead_window_frac))
    cmd = [str(args.anchors_python), "-W", "ignore", str(ANCHOR_SCRIPT), "--lib", lib, "--arch", arch,
           "--recipe", recipe, "--acts", str(files["train"]), "--eval", str(files["eval"]), "--out", str(out),
           "--d-sae", str(d_sae), "--k", str(k), "--batch-size", str(args.batch), "--lr", repr(args.lr),
           "--warmup-steps", str(lm.warmup_steps), "--dead-window-tokens", str(window), "--seed", str(args.seed),
           "--threads", str(args.threads)]  # fmt: skip
    env = {**os.environ, "TQDM_DISABLE": "1", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.anchor_timeout)
    except subprocess.TimeoutExpired:
        return {"status": f"timed out after {args.anchor_timeout} s"}
    objs = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not objs or not out.is_file():
        tail = (proc.stderr.strip().splitlines() or [""])[-1][:300]
        return {"status": f"failed (exit {proc.returncode}): {tail}"}
    return {**json.loads(objs[-1]), "status": "ok", "path": out, "wall_seconds": time.perf_counter() - t0}


def score_anchor(truth: GroundTruth, samples: Samples, path: Path) -> RecoveryReport:
    from safetensors.torch import load_file

    t = load_file(str(path))
    return score_latents(truth, t["decoder"], samples, t["latents"], t["recon"])


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
    p.add_argument("--libs", default="lmscope,saelens,sparsify", help="lmscope and/or the anchors saelens, sparsify")
    p.add_argument("--anchor-recipes", default=",".join(ANCHOR_RECIPES), help="default (the library's) and/or "
                   "matched (lmscope's lr, schedule, AuxK and dead window)")  # fmt: skip
    p.add_argument("--anchors-python", type=Path, default=ANCHORS_PY)
    p.add_argument("--anchor-timeout", type=int, default=1800, help="seconds per anchor run")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "recovery.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    names = [s for s in args.scenarios.split(",") if s]
    unknown = [s for s in names if s not in SCENARIOS]
    if unknown:
        sys.exit(f"unknown scenario(s) {unknown}; choose from {', '.join(SCENARIOS)}")
    libs = [lib for lib in args.libs.split(",") if lib]
    bad = sorted(set(libs) - {"lmscope", "saelens", "sparsify"})
    recipes = [r for r in args.anchor_recipes.split(",") if r]
    bad += sorted(set(recipes) - set(ANCHOR_RECIPES))
    if bad:
        sys.exit(f"unknown --libs / --anchor-recipes {bad}; choose libs from lmscope, saelens, sparsify and recipes "
                 f"from {', '.join(ANCHOR_RECIPES)}")  # fmt: skip
    archs = [a for a in args.archs.split(",") if a] if "lmscope" in libs else []
    anchors = [(lib, arch, r) for lib, arch in ANCHOR_ARCHS if lib in libs for r in recipes]
    skipped = anchor_problem(args.anchors_python) if anchors else None
    if skipped:
        print(skipped, flush=True)
        anchors = []

    results: dict[str, Any] = {}
    anchor_runs: dict[str, Any] = {}
    rows = []
    for name in names:
        data = dataclasses.replace(BASE, d=args.d, seed=args.seed, **SCENARIOS[name])
        cfg = RecoveryBenchConfig(
            data=data, train_samples=args.samples, eval_samples=args.eval_samples, batch_size=args.batch,
            lr=args.lr, seed=args.seed,
        )  # fmt: skip
        t0 = time.perf_counter()
        truth = generate(data)
        samples = truth.sample(cfg.eval_samples, seed=data.seed + 2)  # run_recovery's scoring samples
        done: dict[tuple[str, str, str], dict[str, Any]] = {}
        with tempfile.TemporaryDirectory(prefix="recovery-anchors-") as tmp:
            worker = None
            if anchors:
                files = {"dir": Path(tmp), "train": Path(tmp) / "train.rows", "eval": Path(tmp) / "eval.rows"}
                # the very rows run_recovery trains on (same seed, same order) and the very scoring samples
                write_rows(files["train"], truth.activations(cfg.train_samples, seed=data.seed + 1))
                write_rows(files["eval"], samples.x)
                d_sae, k = cfg.d_sae(), max(1, round(data.active))

                def train_anchors(
                    done: dict[tuple[str, str, str], dict[str, Any]], files: dict[str, Path], d_sae: int, k: int
                ) -> None:
                    for key in anchors:
                        done[key] = run_anchor(*key, files, d_sae, k, args)

                worker = threading.Thread(target=train_anchors, args=(done, files, d_sae, k))
                worker.start()  # one anchor at a time, alongside lmscope's trainer
            if archs:
                result = run_recovery(cfg, dictionary_configs(cfg, archs), truth=truth)
                results[name] = result.to_dict()
                for run, report in result.reports.items():
                    rows.append((name, result.archs[run], report))
            if worker is not None:
                worker.join()
            for (lib, arch, recipe), res in done.items():
                label = f"{lib}-{arch}" + ("" if recipe == "default" else "@matched")
                if res["status"] == "ok":
                    report = score_anchor(truth, samples, res.pop("path"))
                    rows.append((name, label, report))
                    res["report"] = report.to_dict()
                else:
                    print(f"{name} {label}: {res['status']}", flush=True)
                anchor_runs.setdefault(name, {})[label] = res
        seconds = time.perf_counter() - t0
        results.setdefault(name, {})["seconds"] = seconds
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
        "libs": libs,
        "anchor_recipes": recipes if anchors else [],
        "anchors_skipped": skipped,
        "summary": summary,
        "best_anchor_mmcs": {
            scenario: max((r.mmcs for s, a, r in rows if s == scenario and "-" in a), default=None)
            for scenario in names
        },
        "scenarios": results,
        "anchors": anchor_runs,
        **run_info(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, out)

    print(f"{'scenario':9s} {'arch':26s} {'MMCS':>6s} {'recov':>6s} {'FVU':>6s} {'L0':>5s} {'dead':>6s} "
          f"{'absorb':>7s} {'split':>6s}  recovered per frequency decile (D0 most frequent)")  # fmt: skip
    for scenario, arch, r in rows:
        absorb = "-" if r.absorption is None else f"{r.absorption:.2f}"
        split = "-" if r.split_frac is None else f"{r.split_frac:.2f}"
        fvu = "-" if r.fvu is None else f"{r.fvu:.3f}"
        deciles = " ".join(f"{d['recovered']:.2f}" for d in r.deciles)
        print(f"{scenario:9s} {arch:26s} {r.mmcs:6.3f} {r.recovered:6.3f} {fvu:>6s} {r.l0:5.1f} {r.dead_frac:6.3f} "
              f"{absorb:>7s} {split:>6s}  {deciles}")  # fmt: skip
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
