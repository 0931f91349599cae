"""Where an atlas build's time goes: CPU seconds of this process per phase (model forward, encoding, accumulator
update, logit effects, decoder neighbours, co-firing, example rows, SQLite writes, compaction, hashing), measured
by wrapping those functions with timers (no profiler overhead). CPU time, not wall time, so that other jobs on the
machine weigh less; run with OMP_NUM_THREADS=1 to count one core's work. Writes JSON.

    OMP_NUM_THREADS=1 python benchmarks/atlas_profile.py DICT [--tokens 32768] [--activations HARVEST_DIR]

The same script profiles an earlier lmscope checkout: PYTHONPATH=CHECKOUT/src python benchmarks/atlas_profile.py ...
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import lmscope.atlas.build as build_mod
import lmscope.atlas.neighbours as neighbours_mod
import lmscope.atlas.write as write_mod
from _runinfo import run_info
from lmscope import load_model
from lmscope.atlas import AtlasConfig, build_atlas
from lmscope.atlas.accumulate import FeatureAccumulator
from lmscope.core.atomic import atomic_write_json
from lmscope.dictionaries.formats import load_dictionary

SPENT: dict[str, float] = collections.defaultdict(float)


def wrap(owner: Any, name: str, label: str) -> None:
    f = getattr(owner, name)

    @functools.wraps(f)
    def timed(*a: Any, **k: Any) -> Any:
        t = time.process_time()
        try:
            return f(*a, **k)
        finally:
            SPENT[label] += time.process_time() - t

    setattr(owner, name, timed)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dict", help="an lmscope dictionary directory (its cfg.hook is the hook)")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--corpus", default="stdlib")
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--activations", default=None, help="build from this harvest (no forward pass)")
    ap.add_argument("--no-families", action="store_true", help="build without feature families (if the build has them)")
    ap.add_argument("--out", default="benchmarks/results/atlas_profile.json")
    args = ap.parse_args()

    model = load_model(args.model)
    d = load_dictionary(args.dict)
    for owner, name, label in [
        (write_mod, "_logit_rows", "logit effects"),
        (write_mod, "decoder_neighbours", "decoder neighbours"),
        (write_mod, "_example_rows", "example rows"),
        (write_mod, "vocab_strings", "vocabulary strings"),
        (write_mod.db_write, "write_build", "SQLite writes"),
        (write_mod.db_write, "compact", "compaction"),
        (neighbours_mod.CofireSample, "top", "co-firing"),
        (build_mod, "model_hash", "model hash"),
        (FeatureAccumulator, "update", "accumulator update"),
        (type(model), "__call__", "model forward"),
        (type(d), "encode", "encoding"),
    ]:
        wrap(owner, name, label)
    cfg = AtlasConfig(tokens=args.tokens, context=128, batch_size=args.batch)
    if args.no_families and "families" in {f.name for f in dataclasses.fields(AtlasConfig)}:
        cfg = dataclasses.replace(cfg, families=False)
    ended: list[float] = []

    def progress(ev: Any) -> None:
        if ev.finished and not ended:
            ended.append(time.process_time())

    with tempfile.TemporaryDirectory() as tmp:
        w, c = time.perf_counter(), time.process_time()
        store = {"activations": args.activations} if args.activations else {}  # (runs on older lmscope too)
        build_atlas(model, d, args.corpus, out=Path(tmp) / "a.db", config=cfg, progress=progress, **store)
        wall, cpu = time.perf_counter() - w, time.process_time() - c
    stream = (ended[0] if ended else time.process_time()) - c
    phases = {k: round(v, 2) for k, v in sorted(SPENT.items(), key=lambda kv: -kv[1])}
    result = {
        "benchmark": "atlas_profile",
        "model": args.model,
        "hook": d.cfg.hook,
        "d_sae": d.cfg.d_sae,
        "tokens": args.tokens,
        "from_store": args.activations is not None,
        "families": getattr(cfg, "families", None),
        "cpu_s": round(cpu, 2),
        "wall_s": round(wall, 2),
        "stream_cpu_s": round(stream, 2),
        "finalise_cpu_s": round(cpu - stream, 2),
        "phases_cpu_s": phases,
        **run_info(),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
