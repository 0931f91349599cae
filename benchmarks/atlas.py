"""Atlas build throughput vs harvest throughput, and feature-page API latency on a >= 16k-feature atlas.

Both passes run the same model, hook, corpus and token count in one process, harvest first. The atlas is built
with a *trained* TopK dictionary of --d-sae features: lmscope's Trainer on the harvested activations for
--train-epochs epochs (AuxK on, with latents that have not fired for one epoch counted as dead), so that few
latents are dead; an untrained dictionary has many dead latents, whose pages are trivial and whose examples
the build never collects. The JSON reports the atlas's dead count (latents that never fire on its tokens),
and the feature API (`GET /api/features/{id}`, the JSON behind a feature page) and the feature page HTML are
timed in-process with FastAPI's TestClient on random *live* feature ids; p50/p95 reported (target: p95 < 100
ms). Writes JSON.

    python benchmarks/atlas.py [--model smollm2-135m] [--tokens 32768] [--d-sae 16384] [--train-epochs 10]
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import resource
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--hook", default="blocks.6.resid_post")
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

    from fastapi.testclient import TestClient

    from lmscope.web.app import create_app

    torch.manual_seed(0)
    model = load_model(args.model, device=args.device, dtype=args.dtype)
    d_in = model.d_model
    with tempfile.TemporaryDirectory() as tmp:
        hcfg = HarvestConfig(hooks=[args.hook], tokens=args.tokens, context=args.context, batch_size=args.batch,
                             dtype="float16", shard_tokens=65536)  # fmt: skip
        t = time.perf_counter()
        manifest = harvest(model, args.corpus, Path(tmp) / "acts", hcfg, progress=False)
        harvest_s = time.perf_counter() - t
        n_harvest = manifest["tokens"]

        t = time.perf_counter()
        source = StoreSource(Path(tmp) / "acts", [args.hook], args.train_batch, seed=0, epochs=args.train_epochs)
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
        cfg = AtlasConfig(tokens=args.tokens, context=args.context, batch_size=args.batch)
        marks: dict[str, float] = {}
        t = time.perf_counter()
        out = build_atlas(
            model, d, args.corpus, out=Path(tmp) / "atlas.db", config=cfg, progress=False,
            log=lambda msg: marks.setdefault(msg, time.perf_counter()),
        )  # fmt: skip
        atlas_s = time.perf_counter() - t
        pass_s = marks.get("writing examples", time.perf_counter()) - t
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
    tmp_path = out_path.with_name(out_path.name + ".tmp")
    tmp_path.write_text(json.dumps(result, indent=2) + "\n")
    tmp_path.replace(out_path)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
