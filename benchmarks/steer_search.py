"""The demo's steering search on an existing demo run directory, without rerunning the demo (JSON).

    .venv/bin/python benchmarks/steer_search.py --run-dir runs/demo [--quick] [--seconds S] [--threads N] [--out FILE]

Loads the run's model, dictionary and atlas as `lmscope demo` does (the configuration recorded in its
pipeline.json; every stage must be done) and runs only the summary (`demo_summary`), whose steering search
(src/lmscope/workflows/steer_search.py) picks the feature the demo suggests. Prints the summary's steering lines
as the demo does and writes benchmarks/results/steer_search.json (steer_search_quick.json with --quick): the
search's result (`summary["steer"]`: the feature, the rise of its own tokens with its interval, the fluency cost,
the KL, both texts, the command, and the search's own record of every trial), the wall and CPU seconds of the
summary, the search's torch threads, and the machine's 1-minute load average before and after (the machine may be
shared: on a busy one the wall time says little).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", type=Path, required=True, help="a finished `lmscope demo` run directory")
    ap.add_argument("--quick", action="store_true", help="the search of `lmscope demo --quick`")
    ap.add_argument(
        "--seconds",
        type=float,
        default=None,
        help="override the search's time cap (a large value: every trial runs, whatever the machine's load)",
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="override the search's torch threads (0: torch's own setting, two on a 2-core machine)",
    )
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    out = args.out or ROOT / "results" / ("steer_search_quick.json" if args.quick else "steer_search.json")
    out.parent.mkdir(parents=True, exist_ok=True)

    import torch

    from lmscope.cli.demo_cmd import print_steer
    from lmscope.core.atomic import atomic_write_json
    from lmscope.workflows.demo import Demo, DemoConfig, demo_summary
    from lmscope.workflows.steer_search import SteerSearchConfig

    cfg = DemoConfig(**json.loads((args.run_dir / "pipeline.json").read_text())["config"])
    job = Demo(cfg, args.run_dir, device="cpu")
    status = job.pipeline().status()
    if any(v != "done" for v in status.values()):
        raise SystemExit(f"{args.run_dir} is not a finished demo run: {status}")
    job.model  # noqa: B018 - load it before the clock starts, as the demo has by the time it summarises
    load_before = os.getloadavg()[0]
    wall, cpu = time.perf_counter(), time.process_time()
    search = SteerSearchConfig.quick() if args.quick else SteerSearchConfig()
    if args.seconds is not None:
        search = dataclasses.replace(search, seconds=args.seconds)
    if args.threads is not None:
        search = dataclasses.replace(search, threads=args.threads or None)
    summary = demo_summary(job, search)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    record = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "run_dir": str(args.run_dir),
        "quick": args.quick,
        "summary_wall_seconds": wall,
        "summary_cpu_seconds": cpu,
        "loadavg_1min_before": load_before,
        "loadavg_1min_after": os.getloadavg()[0],
        "threads": search.threads or torch.get_num_threads(),
        "steer": summary["steer"],
    }
    atomic_write_json(out, record)
    print_steer(summary["steer"])
    print(f"summary {wall:.1f} s wall, {cpu:.1f} s CPU; wrote {out}")


if __name__ == "__main__":
    main()
