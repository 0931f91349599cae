"""Atlas build throughput vs harvest throughput, and feature-page API latency on a >= 16k-feature atlas.

Both passes run the same model, hook, corpus and token count in one process, harvest first. The atlas is built
with a *trained* TopK dictionary of --d-sae features: lmscope's Trainer on the harvested activations for
--train-epochs epochs (AuxK on, with latents that have not fired for one epoch counted as dead), so that few
latents are dead; an untrained dictionary has many dead latents, whose pages are trivial and whose examples
the build never collects. The JSON reports the atlas's dead count (latents that never fire on its tokens),
and the feature API (`GET /api/features/{id}`, the JSON behind a feature page) and the feature page HTML are
timed in-process with FastAPI's TestClient on random *live* feature ids; p50/p95 reported (target: p95 < 100
ms). Writes JSON.

Three builds are timed against the harvest, `--repeats` rounds of them interleaved (harvest, atlas from the model,
atlas from the harvested store, then again) so that other jobs on the machine weigh on all of them alike: each
round's ratios are reported, and medians. Wall seconds and this process's CPU seconds (all threads) are both
recorded; on a shared machine the CPU seconds are the steadier measure. The atlas from the store reads the
harvest's float16 activations instead of running the model (`build_atlas(activations=...)`).

    python benchmarks/atlas.py [--model smollm2-135m] [--tokens 32768] [--d-sae 16384] [--train-epochs 10]
    python benchmarks/atlas.py --layer 10 --d-sae 4608 --tokens 65536     # the demo's configuration
    python benchmarks/atlas.py --dict DIR                                 # a saved dictionary, no training
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import random
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import lmscope
from lmscope import load_model
from lmscope.activations import HarvestConfig, harvest
from lmscope.activations.sources import StoreSource
from lmscope.atlas import AtlasConfig, build_atlas, open_atlas
from lmscope.core.atomic import atomic_write_json
from lmscope.dictionaries import DictConfig
from lmscope.training import RunSpec, TrainConfig, Trainer


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def time_requests(client, urls: list[str]) -> dict[str, float]:
    for u in urls[:20]:  # warm-up (connections per thread, caches)
        client.get(u)
    times = []
    for u in urls:
        t = time.perf_counter()
        r = client.get(u)
        times.append((time.perf_counter() - t) * 1000)
        if r.status_code != 200:
            raise SystemExit(f"{u} -> {r.status_code}: {r.text[:200]}")
    return {"p50_ms": round(statistics.median(times), 2), "p95_ms": round(pct(times, 0.95), 2),
            "max_ms": round(max(times), 2), "requests": len(times)}  # fmt: skip


def timed(fn):
    """(result, wall seconds, CPU seconds of this process)."""
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


def timed_build(model, d, corpus, out: Path, cfg, **kw) -> tuple[Path, float, float, float]:
    """(atlas, wall seconds, CPU seconds, wall seconds of the streaming pass: until its progress event says
    finished; the rest is the finalisation: logit effects, neighbours, co-firing, rows and writes)."""
    marks: list[float] = []

    def progress(ev) -> None:
        if ev.finished and not marks:
            marks.append(time.perf_counter())

    t = time.perf_counter()
    path, wall, cpu = timed(lambda: build_atlas(
        model, d, corpus, out=out, config=cfg, progress=progress, overwrite=True, **kw,
    ))  # fmt: skip
    return path, wall, cpu, (marks[0] if marks else time.perf_counter()) - t


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--hook", default="blocks.6.resid_post")
    ap.add_argument("--layer", type=int, default=None, help="shorthand for --hook blocks.LAYER.resid_post")
    ap.add_argument("--dict", default=None, help="a saved dictionary for the hook (skips training)")
    ap.add_argument("--save-dict", default=None, help="save the trained dictionary here (for --dict later)")
    ap.add_argument("--repeats", type=int, default=1, help="rounds of harvest / atlas / atlas from the store")
    ap.add_argument("--no-store", action="store_true", help="skip the atlas built from the harvested store")
    ap.add_argument("--no-families", action="store_true", help="build without feature families (if the build has them)")
    ap.add_argument("--corpus", default="stdlib")
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--d-sae", type=int, default=16384)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--train-epochs", type=int, default=10, help="epochs of training on the harvested activations")
    ap.add_argument("--train-batch", type=int, default=1024)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--out", default="benchmarks/results/atlas.json")
    ap.add_argument("--keep", default=None, help="also copy the atlas file here")
    args = ap.parse_args()
    if args.layer is not None:
        args.hook = f"blocks.{args.layer}.resid_post"

    from fastapi.testclient import TestClient

    from lmscope.web.app import create_app

    torch.manual_seed(0)
    model = load_model(args.model, device=args.device, dtype=args.dtype)
    d_in = model.d_model
    with tempfile.TemporaryDirectory() as tmp:
        hcfg = HarvestConfig(hooks=[args.hook], tokens=args.tokens, context=args.context, batch_size=args.batch,
                             dtype="float16", shard_tokens=65536)  # fmt: skip
        acts_dir = Path(tmp) / "acts"
        manifest, harvest_s, harvest_cpu = timed(lambda: harvest(model, args.corpus, acts_dir, hcfg, progress=False))
        n_harvest = manifest["tokens"]

        if args.dict:
            from lmscope.dictionaries.formats import load_dictionary

            d = load_dictionary(args.dict)
            if d.cfg.hook != args.hook:
                raise SystemExit(f"--dict reads {d.cfg.hook}, not {args.hook}; pass --hook/--layer to match")
            train = {"saved": str(Path(args.dict).resolve()), "config": d.cfg.to_dict()}
        else:
            t = time.perf_counter()
            source = StoreSource(acts_dir, [args.hook], args.train_batch, seed=0, epochs=args.train_epochs)
            rows = source.store.n_rows or 0
            steps = args.train_epochs * (rows // args.train_batch)
            tc = TrainConfig(total_tokens=steps * args.train_batch, warmup_steps=max(1, steps // 10),
                             dead_window_tokens=rows, log_every=10**9)  # fmt: skip
            dcfg = DictConfig(arch="topk", d_in=d_in, d_sae=args.d_sae, k=args.k, hook=args.hook, model=args.model)
            trainer = Trainer([RunSpec(dcfg, name="sae")], tc)
            d = trainer.fit(source)["sae"]
            train = {"rows": rows, "epochs": args.train_epochs, "steps": trainer.step, "tokens": trainer.tokens,
                     "batch": args.train_batch, "seconds": round(time.perf_counter() - t, 2),
                     "dead_frac_at_end": trainer.runs[0].dead.dead_fraction(),
                     "train_fvu_mean_over_steps": trainer.runs[0].record.get("fvu")}  # fmt: skip
            if args.save_dict:
                from lmscope.dictionaries.formats import save_dictionary

                save_dictionary(d, args.save_dict)
        cfg = AtlasConfig(tokens=args.tokens, context=args.context, batch_size=args.batch)
        if args.no_families and "families" in {f.name for f in dataclasses.fields(AtlasConfig)}:
            cfg = dataclasses.replace(cfg, families=False)
        rounds: list[dict[str, float]] = []
        for r in range(args.repeats):
            if r:  # a fresh harvest each round after the first (whose store also trained the dictionary)
                shutil.rmtree(acts_dir)
                _, harvest_s, harvest_cpu = timed(lambda: harvest(model, args.corpus, acts_dir, hcfg, progress=False))
            out, atlas_s, atlas_cpu, pass_s = timed_build(model, d, args.corpus, Path(tmp) / "atlas.db", cfg)
            one = {"harvest_s": harvest_s, "harvest_cpu_s": harvest_cpu, "atlas_s": atlas_s,
                   "atlas_cpu_s": atlas_cpu, "atlas_pass_s": pass_s}  # fmt: skip
            if not args.no_store:
                _, store_s, store_cpu, store_pass = timed_build(
                    model, d, args.corpus, Path(tmp) / "atlas_store.db", cfg, activations=acts_dir
                )
                one |= {"store_atlas_s": store_s, "store_atlas_cpu_s": store_cpu, "store_atlas_pass_s": store_pass}
            one = {k: round(v, 2) for k, v in one.items()}
            one["atlas_vs_harvest"] = round(one["harvest_s"] / one["atlas_s"], 3)
            one["atlas_vs_harvest_cpu"] = round(one["harvest_cpu_s"] / one["atlas_cpu_s"], 3)
            if not args.no_store:
                one["store_atlas_vs_harvest"] = round(one["harvest_s"] / one["store_atlas_s"], 3)
                one["store_atlas_vs_harvest_cpu"] = round(one["harvest_cpu_s"] / one["store_atlas_cpu_s"], 3)
            rounds.append(one)
            print(json.dumps(one), flush=True)
        harvest_s, atlas_s, pass_s = (median([x[k] for x in rounds]) for k in ("harvest_s", "atlas_s", "atlas_pass_s"))
        size_mb = out.stat().st_size / 1e6
        if args.keep:
            Path(args.keep).write_bytes(out.read_bytes())

        conn = open_atlas(out)
        live = [int(r[0]) for r in conn.execute("SELECT id FROM features WHERE dead = 0 ORDER BY id")]
        conn.close()
        client = TestClient(create_app(out))
        overview = client.get("/api/overview").json()
        rng = random.Random(0)
        ids = [rng.choice(live) for _ in range(args.requests)]
        feature_api = time_requests(client, [f"/api/features/{i}" for i in ids])
        feature_page = time_requests(client, [f"/features/{i}" for i in ids[: max(40, args.requests // 3)]])
        words = ["def", "return", "self", "import", "class", "the", "value", "list", "error", "print"]
        search_api = time_requests(client, [f"/api/search?q={rng.choice(words)}" for _ in range(60)])
        list_api = time_requests(client, ["/api/features?sort=density&order=desc&limit=50"] * 40)

    result = {
        "benchmark": "atlas",
        "model": args.model,
        "hook": args.hook,
        "corpus": args.corpus,
        "device": str(model.device),
        "dtype": str(model.dtype),
        "tokens": n_harvest,
        "context": args.context,
        "batch_contexts": args.batch,
        "dictionary": {"arch": "topk", "d_sae": args.d_sae, "k": args.k, "trained": train},
        "dead": overview["dead"],
        "dead_fraction": round(overview["dead"] / args.d_sae, 4),
        "live_features": len(live),
        "atlas_metrics": (overview.get("metrics") or {}).get("atlas"),
        "requested_ids": "random live features (seed 0)",
        "harvest_tokens_per_s": round(n_harvest / harvest_s, 1),
        "atlas_tokens_per_s": round(n_harvest / atlas_s, 1),
        "atlas_pass_tokens_per_s": round(n_harvest / pass_s, 1),
        "atlas_vs_harvest": round(harvest_s / atlas_s, 3),
        "harvest_s": round(harvest_s, 2),
        "atlas_s": round(atlas_s, 2),
        "atlas_pass_s": round(pass_s, 2),
        "atlas_finalise_s": round(atlas_s - pass_s, 2),
        "atlas_mb": round(size_mb, 1),
        "rounds": rounds,
        "median": {k: round(median([x[k] for x in rounds]), 3) for k in rounds[0]},
        "families": getattr(cfg, "families", None),
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "feature_api": feature_api,
        "feature_page_html": feature_page,
        "search_api": search_api,
        "list_api": list_api,
        "p95_target_ms": 100,
        "p95_ok": feature_api["p95_ms"] < 100,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "machine": {"platform": platform.platform(), "python": sys.version.split()[0], "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "lmscope": lmscope.__version__,
                    "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
    }  # fmt: skip
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_path, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
