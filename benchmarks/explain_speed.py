"""Where the time of `lmscope explain` (offline `stats` explainer) goes: process CPU time per phase over the first
N live features of an atlas, the way `explain_atlas` runs them on one core (stats_run.py): annotating every
context once (the position table), reading evidence a chunk at a time, the rule search (`explain_stats`), the
held-out `rule-detection` score, and writing the labels (one transaction a chunk; its wall time too).

The atlas is copied to a temporary file first (labels are written to the copy, never to the atlas given). CPU
time is the process's own (time.process_time), so other jobs on the machine slow the wall clock, not it; the
machine's load average is recorded beside it.

    .venv/bin/python benchmarks/explain_speed.py --atlas /work/runs/labels/atlas.db --features 1200
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from lmscope.explain.evidence import AtlasEvidence
from lmscope.explain.labels import open_rw, write_machine_labels
from lmscope.explain.scorers import rule_score
from lmscope.explain.stats_explainer import explain_stats, text_frequencies
from lmscope.explain.stats_run import STATS_CHUNK


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--atlas", type=Path, required=True)
    p.add_argument("--features", type=int, default=1200, help="the first N live features")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/explain_speed.json"))
    args = p.parse_args()
    if not args.atlas.is_file():
        sys.exit(f"error: {args.atlas} does not exist; give an atlas made by `lmscope atlas`")
    cpu: dict[str, float] = {}

    def tick(name: str, t0: float) -> None:
        cpu[name] = cpu.get(name, 0.0) + time.process_time() - t0

    with tempfile.TemporaryDirectory() as d:
        copy = Path(d) / "atlas.db"
        shutil.copy(args.atlas, copy)
        conn = open_rw(copy)
        t0 = time.process_time()
        src = AtlasEvidence(conn)
        feats = src.live_features()[: args.features]
        freq = text_frequencies(src.token_freq(), src.vocab)
        tick("open, vocabulary and token frequencies", t0)
        t0 = time.process_time()
        table = src.positions()
        tick("annotate every context once (position table)", t0)
        gc.freeze()  # as stats_run.run_stats does
        write_wall = 0.0
        for i in range(0, len(feats), STATS_CHUNK):
            t0 = time.process_time()
            evs = src.evidence_many(feats[i : i + STATS_CHUNK])
            tick("read evidence", t0)
            rows = []
            for ev in evs:
                t0 = time.process_time()
                lab = explain_stats(ev, freq, src.vocab, kinds=src.kinds, promoted=src.promoted(ev.feature),
                                    positions=table)  # fmt: skip
                tick("rule search (explain_stats)", t0)
                t0 = time.process_time()
                sc = rule_score("detection", lab.rule, ev, kinds=src.kinds, positions=table)
                tick("held-out rule-detection score", t0)
                rows.append((ev.feature, lab.text, sc.score, sc.scorer))
            t0, w0 = time.process_time(), time.perf_counter()
            write_machine_labels(conn, rows, "stats")
            tick("write labels", t0)
            write_wall += time.perf_counter() - w0
        conn.close()
    n = len(feats)
    out = {
        "atlas": str(args.atlas), "features": n, "cores": os.cpu_count(), "load_average": os.getloadavg(),
        "cpu_s": {k: round(v, 3) for k, v in cpu.items()},
        "cpu_ms_per_feature": {k: round(1000 * v / max(1, n), 3) for k, v in cpu.items()},
        "write_wall_s": round(write_wall, 3), "total_cpu_s": round(sum(cpu.values()), 3),
        "command": " ".join(sys.argv),
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(out, indent=1) + "\n")
    os.replace(tmp, args.out)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
