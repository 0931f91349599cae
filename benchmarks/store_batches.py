"""How long an activation store takes to hand the trainer a shuffled batch, and what verifying its shards costs (JSON).

    .venv/bin/python benchmarks/store_batches.py [--store DIR] [--batches 200] [--ref 3edc66f~1] [--rounds 3]

`ActivationStore.batches` (shuffled, special tokens excluded, fp32, batch 4096 by default) of the working tree and,
with `--ref`, of `src/lmscope/activations/store.py` at that git revision (read with `git show` and imported on its
own), each over the same store with checksums off and the shards in the page cache (one untimed pass first), in
alternating rounds so load from other jobs hits both: `ms_per_batch` is each round's wall time / batches, median
over rounds. Then each shard's sha256 (`core.checksums.file_sha256`, cached file): `verify_seconds_per_shard`
(median) and `verify_seconds_store` (their sum), and `verify_mapped_pairs_seconds_store`: every shard mapped and
verified as the store does it on first use (hashed from its map, two shards at a time on pool threads), what a
process pays once for the whole store. Writes benchmarks/results/store_batches.json.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from _gitref import module_at
from _runinfo import run_info
from lmscope.activations.store import ActivationStore, _Window
from lmscope.core.atomic import atomic_write_json
from lmscope.core.checksums import file_sha256

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"


def time_batches(cls: Any, store: Path, batches: int, batch_size: int) -> float:
    s = cls.open(store, verify=False)
    t0 = time.perf_counter()
    n = 0
    for _ in s.batches(batch_size=batch_size, shuffle=True, seed=0, epochs=1):
        n += 1
        if n == batches:
            break
    return (time.perf_counter() - t0) / max(n, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", type=Path, default=RESULTS / "acts_smollm2_stdlib_l6")
    ap.add_argument("--batches", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--ref", default=None, help="also time the store of this git revision, alternating")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS / "store_batches.json")
    args = ap.parse_args()
    if not (args.store / "manifest.json").exists():
        raise SystemExit(
            f"{args.store} is not a harvest directory (no manifest.json); run benchmarks/train_throughput.py once, "
            "which harvests it, or pass --store DIR"
        )
    torch.set_num_threads(args.threads)
    variants: dict[str, Any] = {"tree": ActivationStore}
    if args.ref:
        ref_store = module_at(args.ref, "src/lmscope/activations/store.py", "ref_store")
        variants = {"ref": ref_store.ActivationStore, **variants}
    for cls in variants.values():  # untimed: the shards into the page cache, first-touch costs paid
        time_batches(cls, args.store, args.batches, args.batch_size)
    rounds: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(args.rounds):
        order = list(variants) if r % 2 == 0 else list(variants)[::-1]
        for name in order:
            rounds[name].append(time_batches(variants[name], args.store, args.batches, args.batch_size))
    ms = {name: round(1000 * statistics.median(v), 2) for name, v in rounds.items()}

    store = ActivationStore.open(args.store, verify=False)
    shard_files = [args.store / s["file"] for s in store.manifest["shards"]]
    per_shard = []
    for f in shard_files:
        t0 = time.perf_counter()
        file_sha256(f)
        per_shard.append(time.perf_counter() - t0)
    size = sum(f.stat().st_size for f in shard_files)
    # as the store verifies: each shard mapped and hashed from its map, two at a time on pool threads
    checked = ActivationStore.open(args.store, verify=True)
    window = _Window(checked, list(checked.hooks), 0, True, torch.Generator(), "cpu", torch.float32)
    t0 = time.perf_counter()
    for i in range(0, len(shard_files), 2):
        window._map_all(list(range(i, min(i + 2, len(shard_files)))))
        window.mapped.clear()
    mapped_pairs = time.perf_counter() - t0
    out = {
        "benchmark": "store_batches",
        "store": str(args.store),
        "batches": args.batches,
        "batch_size": args.batch_size,
        "rounds": args.rounds,
        "ref": args.ref,
        "ms_per_batch": ms,
        "ms_per_batch_rounds": {name: [round(1000 * x, 2) for x in v] for name, v in rounds.items()},
        "speedup": round(ms["ref"] / ms["tree"], 3) if "ref" in ms else None,
        "shards": len(shard_files),
        "store_bytes": size,
        "verify_seconds_per_shard": round(statistics.median(per_shard), 4),
        "verify_seconds_store": round(sum(per_shard), 3),
        "verify_gb_per_s": round(size / sum(per_shard) / 1e9, 3),
        "verify_mapped_pairs_seconds_store": round(mapped_pairs, 3),
        **run_info(),
    }
    atomic_write_json(args.out, out)
    line = f"batch of {args.batch_size}: " + ", ".join(f"{n} {v:.1f} ms" for n, v in ms.items())
    print(
        line + f"; verifying {len(shard_files)} shards ({size / 1e9:.2f} GB): {sum(per_shard):.1f} s one by one, "
        f"{mapped_pairs:.1f} s mapped two at a time as the store does"
    )


if __name__ == "__main__":
    main()
