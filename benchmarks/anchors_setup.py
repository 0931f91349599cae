"""Build the anchors' virtual environment (SAELens, sparsify, TransformerLens) on first use.

The benchmark scripts call `ensure_anchors` before comparing against the anchors: if the environment's Python is
missing, it runs `benchmarks/anchors_env.sh` (torch==2.13.0 first, then the pinned anchors under a constraints
file). It returns None when the environment is ready, else the reason it is not, for the JSON report.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent / "anchors_env.sh"


def ensure_anchors(python: Path, timeout: int = 1800) -> str | None:
    if python.exists():
        return None
    print(f"{python} is missing: building it with {SCRIPT} (once; about 2 GB)", flush=True)
    try:
        done = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"{SCRIPT} did not finish within {timeout} s"
    if done.returncode != 0 or not python.exists():
        tail = (done.stdout + done.stderr).strip().splitlines()[-3:]
        return f"{SCRIPT} failed (exit {done.returncode}): {' | '.join(tail)}"
    return None
