"""GGUF load time with a cold and a warm dequantisation cache: `load_model` on the embedded SmolLM2 GGUF (JSON).

    .venv/bin/python benchmarks/load.py [--model smollm2-135m] [--rounds 3]

`load_model` on a GGUF file parses and dequantises it, then saves the float32 result as a plain HF directory
under $LMSCOPE_CACHE/gguf/<sha256>/ (docs/models.md); later loads read that directory. Each load here runs in a
fresh Python process (so nothing is cached in memory between loads) with LMSCOPE_CACHE pointing into a temporary
directory, never at the user's cache:

- cold: an empty cache directory, so the load parses, dequantises and writes the cache (what a first load does);
- warm: the cache directory a cold load filled, so the load reads the safetensors directory.

Rounds alternate cold, warm, cold, warm ... (a new empty directory for every cold load). Reported per kind: every
round's `load_model` seconds (imports excluded: timed inside the process around the call), the median and the
best, and `speedup_median` = cold median / warm median. The file's bytes are in the OS page cache after the first
load, for both kinds alike. Writes benchmarks/results/load.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import lmscope
from lmscope.core.atomic import atomic_write_json

ROOT = Path(__file__).resolve().parent

CHILD = """
import json, sys, time
import torch
from lmscope.model.loading import load_model
t = time.perf_counter()
model = load_model(sys.argv[1], device="cpu")
seconds = time.perf_counter() - t
print(json.dumps({"seconds": seconds, "n_layers": model.n_layers, "dtype": str(model.dtype),
                  "threads": torch.get_num_threads()}))
"""


def one_load(model: str, cache: Path) -> dict[str, Any]:
    env = {**os.environ, "LMSCOPE_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", CHILD, model], capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"load_model({model!r}) failed (exit {proc.returncode}): {proc.stderr[-1500:]}")
    return json.loads(lines[-1])  # type: ignore[no-any-return]


def dir_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="a GGUF spec: the alias or a .gguf path")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "load.json")
    args = ap.parse_args()

    from lmscope.model.loading import resolve_spec

    kind, where = resolve_spec(args.model)
    if kind != "gguf":
        raise SystemExit(f"{args.model} is not a GGUF file; this benchmark times the GGUF cache")
    work = Path(tempfile.mkdtemp(prefix="lmscope-bench-load-"))
    warm_cache = work / "warm"
    seconds: dict[str, list[float]] = {"cold": [], "warm": []}
    cache_mb = None
    try:
        for r in range(args.rounds):
            cold_cache = work / f"cold{r}"
            seconds["cold"].append(one_load(args.model, cold_cache)["seconds"])
            if r == 0:
                cold_cache.rename(warm_cache)  # the cache a cold load wrote is the warm loads' cache
                cache_mb = round(dir_mb(warm_cache), 1)
            else:
                shutil.rmtree(cold_cache, ignore_errors=True)
            info = one_load(args.model, warm_cache)
            seconds["warm"].append(info["seconds"])
    finally:
        shutil.rmtree(work, ignore_errors=True)

    med = {k: statistics.median(v) for k, v in seconds.items()}
    result = {
        "benchmark": "load",
        "model": args.model,
        "gguf": str(where),
        "gguf_mb": round(Path(where).stat().st_size / 1e6, 1),
        "cache_mb": cache_mb,
        "rounds": args.rounds,
        "seconds": seconds,
        "median_seconds": med,
        "best_seconds": {k: min(v) for k, v in seconds.items()},
        "speedup_median": round(med["cold"] / med["warm"], 2),
        "speedup_best": round(min(seconds["cold"]) / min(seconds["warm"]), 2),
        "loaded": info,
        "lmscope_version": lmscope.__version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
