"""Attribution graphs by prompt length on SmolLM2: time, peak memory, size, scores, against a dense N² matrix (JSON).

    .venv/bin/python benchmarks/circuit.py --transcoders TC/ [--lengths 16,64,256,1024,2048] [--features 256]

Each length runs in a fresh process (so its peak RSS is its own), on a prompt of exactly that many tokens of the
stdlib corpus. Reported per length: `attribute` seconds, peak resident memory of the process (model and
transcoders included), nodes, edges kept, rows computed, the batch of rows per backward pass, the replacement and
completeness scores of the unpruned and the pruned graph (node 0.8, edge 0.98), the bytes the same graph would take
as a dense float32 n_nodes x n_nodes matrix, and what the per-row edge cap dropped.

With `--exact-upto N` (default 256), lengths up to N are also built without the per-row cap, and the capped graph
is compared with the exact one: the scores' differences and the overlap of the pruned node sets. Writes
benchmarks/results/circuit.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

import lmscope
from lmscope.core.atomic import atomic_write_json

ROOT = Path(__file__).resolve().parent

CHILD = r"""
import itertools, json, resource, sys, time
import numpy as np, torch
from lmscope.model.loading import load_model
from lmscope.circuits import AttributionConfig, TranscoderSet, attribute, prune, scores
from lmscope.circuits.attribute import dense_bytes
from lmscope.corpora import open_corpus
args = json.loads(sys.argv[1])
model = load_model(args["model"], device="cpu", dtype="float32")
tcs = TranscoderSet.load(args["transcoders"])
ids = []
for doc in open_corpus("stdlib").documents():
    ids += model.tokenizer(doc, add_special_tokens=False)["input_ids"]
    if len(ids) >= args["n"]:
        break
ids = torch.tensor(ids[: args["n"]])
def build(cap):
    cfg = AttributionConfig(max_feature_nodes=args["features"], max_edges_per_row=cap, max_prompt_tokens=4096)
    t = time.perf_counter()
    g = attribute(model, tcs, ids, cfg)
    return g, time.perf_counter() - t
g, secs = build(args["cap"])
pr = prune(g, 0.8, 0.98)
out = {"n": args["n"], "seconds": secs, "nodes": g.n_nodes, "edges": int(g.adjacency.nnz),
       "rows": int((np.diff(g.adjacency.indptr) > 0).sum()), "batch_size": g.meta["batch_size"],
       "active_features": g.meta["n_active_features"], "visited_features": g.meta["n_visited_features"],
       "pruned_nodes": int(pr.node_mask.sum()), "pruned_edges": int(pr.edges.nnz),
       "scores": {"unpruned": scores(g), "pruned": scores(g, pr.edges)},
       "dense_n2_bytes": dense_bytes(g), "dropped": g.meta["dropped"],
       "targets": [{"label": t["label"], "p": t["probability"]} for t in g.targets]}
if args["exact"]:
    ge, se = build(None)
    pe = prune(ge, 0.8, 0.98)
    a = {int(i) for i in np.nonzero(pr.node_mask)[0]}
    b = {int(i) for i in np.nonzero(pe.node_mask)[0]}
    out["exact"] = {"seconds": se, "edges": int(ge.adjacency.nnz),
                    "scores": {"unpruned": scores(ge), "pruned": scores(ge, pe.edges)},
                    "pruned_node_jaccard": len(a & b) / max(1, len(a | b))}
out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps(out))
"""


def run(args: dict[str, Any]) -> dict[str, Any]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(args)], capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"n": args["n"], "error": f"exit {proc.returncode}: {proc.stderr[-1500:]}"}
    return json.loads(lines[-1])  # type: ignore[no-any-return]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--transcoders", required=True)
    ap.add_argument("--lengths", default="16,64,256,1024,2048")
    ap.add_argument("--features", type=int, default=256, help="feature rows computed per graph")
    ap.add_argument("--cap", type=int, default=16384, help="edges kept per row")
    ap.add_argument("--exact-upto", type=int, default=256)
    ap.add_argument("--out", default=str(ROOT / "results" / "circuit.json"))
    a = ap.parse_args()
    rows = []
    for n in [int(x) for x in a.lengths.split(",")]:
        t = time.perf_counter()
        r = run({"model": a.model, "transcoders": a.transcoders, "n": n, "features": a.features, "cap": a.cap,
                 "exact": n <= a.exact_upto})  # fmt: skip
        r["wall_seconds"] = time.perf_counter() - t
        rows.append(r)
        print(json.dumps({k: v for k, v in r.items() if k not in ("targets",)}), flush=True)
    result = {
        "benchmark": "circuit",
        "command": " ".join([".venv/bin/python", "benchmarks/circuit.py", *sys.argv[1:]]),
        "lmscope": lmscope.__version__,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.platform(),
        "cpus": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d"),
        "transcoders": json.loads((Path(a.transcoders) / "transcoders.json").read_text()).get("recipe"),
        "results": rows,
    }
    atomic_write_json(Path(a.out), result)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
