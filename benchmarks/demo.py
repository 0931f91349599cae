"""Wall time, peak memory and results of `lmscope demo --no-serve` from an empty run directory (JSON).

    .venv/bin/python benchmarks/demo.py [--quick] [--run-dir DIR] [--keep]

Runs the demo CLI in a child process on the CPU (`lmscope demo --no-serve --device cpu --run-dir DIR`, plus
`--quick` if asked), into a fresh run directory (by default a temporary one, removed afterwards unless --keep).
Peak memory is the child's maximum resident set size, from `getrusage(RUSAGE_CHILDREN)` after it exits: the
figure `/usr/bin/time -v` reports as "Maximum resident set size". The stage times and results come from the
run's own `pipeline.json` and `eval.json`. `gguf_cache_present` says whether the dequantised model was already
cached (docs/models.md): a first run on a fresh machine also pays that once. The demo's output goes to
benchmarks/results/demo[_quick].log. Writes benchmarks/results/demo.json (demo_quick.json with --quick).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lmscope

ROOT = Path(__file__).resolve().parent


def gguf_cache_present() -> bool | None:
    from lmscope.core.checksums import file_sha256
    from lmscope.model.loading import _gguf_cache, resolve_spec

    kind, where = resolve_spec("smollm2-135m")
    return _gguf_cache(Path(where), file_sha256(Path(where))) is not None if kind == "gguf" else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="lmscope demo --quick")
    ap.add_argument("--run-dir", type=Path, default=None, help="default: a temporary directory")
    ap.add_argument("--keep", action="store_true", help="keep the run directory")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    name = "demo_quick" if args.quick else "demo"
    out = args.out or ROOT / "results" / f"{name}.json"
    log = out.with_suffix(".log")
    out.parent.mkdir(parents=True, exist_ok=True)

    tmp = None
    run_dir = args.run_dir
    if run_dir is None:
        tmp = Path(tempfile.mkdtemp(prefix="lmscope-bench-demo-"))
        run_dir = tmp / "run"
    if run_dir.exists() and any(run_dir.iterdir()):
        raise SystemExit(f"{run_dir} is not empty: the benchmark runs the demo from an empty run directory")
    exe = Path(sys.executable).with_name("lmscope")
    cli = [str(exe)] if exe.exists() else [sys.executable, "-m", "lmscope.cli.app"]
    cmd = [*cli, "demo", "--no-serve", "--device", "cpu", "--run-dir", str(run_dir)]
    if args.quick:
        cmd.append("--quick")
    cached = gguf_cache_present()
    t = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "COLUMNS": "120"})
    wall = time.perf_counter() - t
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB on Linux
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed (exit {proc.returncode}); see {log}")

    record = json.loads((run_dir / "pipeline.json").read_text())
    stages = record.get("stages", {})
    eval_json = run_dir / "eval.json"
    ev: dict[str, Any] = json.loads(eval_json.read_text()) if eval_json.is_file() else {}
    keys = ("fvu", "l0", "dead_frac", "ce_clean", "ce_spliced", "ce_zero_ablate", "ce_recovered", "kl_spliced")
    result = {
        "benchmark": name,
        "command_run": " ".join(["lmscope", *cmd[len(cli) :]]).replace(str(run_dir), "RUN_DIR"),
        "wall_seconds": round(wall, 1),
        "peak_rss_mb": round(peak_kb / 1024, 1),
        "peak_rss_gb": round(peak_kb * 1024 / 1e9, 2),
        "stage_seconds": {k: round(v.get("seconds", 0.0), 1) for k, v in stages.items()},
        "stage_summaries": {k: v.get("summary") for k, v in stages.items()},
        "eval": {k: ev.get(k) for k in keys},
        "gguf_cache_present": cached,
        "run_dir": str(run_dir) if args.keep or args.run_dir else None,
        "lmscope_version": lmscope.__version__,
        "python": sys.version.split()[0],
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
    }
    if tmp is not None and not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)
    tmp_out = out.with_name(out.name + ".tmp")
    tmp_out.write_text(json.dumps(result, indent=2))
    os.replace(tmp_out, out)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
