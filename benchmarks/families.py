"""Feature families and the map on a real atlas: time, families per level, quality against shuffled families (JSON).

    .venv/bin/python benchmarks/families.py [--atlas runs/demo/atlas.db] [--weights 0,0.3,0.5,0.7,1] [--threads 1]
                                            [--out FILE]

Copies the atlas into a temporary folder (the original is never written), then runs `add_families` on the copy
(lmscope.atlas.families: the dictionary the atlas records, the default levels) once per co-firing weight, and
writes benchmarks/results/families.json: per weight the seconds of each step (wall) and the process's CPU seconds,
and per level the number of families, the largest and median size, the mean decoder cosine and co-firing within a
family against the same for shuffled families of the same sizes, the share of families (2+ members) whose label
names a shared token or label word (shuffled likewise), and the share of each point's 10 nearest map neighbours in
its family; and, for the default weight, sample labels (the largest labelled families of the finest and middle
levels, and the largest mixed ones); and, for the default weight, the map's layout compared with the alternatives
(`layouts`): t-SNE as stored, a spectral embedding of the same neighbour graph (scikit-learn's, on the affinity
exp(-d / median d) of each feature's 30 nearest neighbours, symmetrised), and the PCA start alone, each with its
seconds and the share of each point's 10 nearest map neighbours in its finest family. Also the machine's
1-minute load average before and after: the machine may be shared, and on a busy one the wall time says little
(the CPU seconds say more).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--atlas", type=Path, default=Path("/work/runs/demo/bench/atlas.db"))
    ap.add_argument("--dict", type=Path, default=None, help="the atlas's dictionary (default: where it records it)")
    ap.add_argument(
        "--weights", default="0,0.3,0.5,0.7,1", help="co-firing weights to compare (0.5, the default, among them)"
    )
    ap.add_argument("--threads", type=int, default=1, help="OpenMP/BLAS threads (t-SNE's gradient uses them)")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "families.json")
    args = ap.parse_args()
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    sys.path.insert(0, str(ROOT.parent / "src"))
    from lmscope.atlas.db.families import family_rows
    from lmscope.atlas.db.schema import open_atlas
    from lmscope.atlas.families import FamilyConfig, add_families

    weights = [float(w) for w in args.weights.split(",")]
    load_before = os.getloadavg()[0]
    runs = []
    layouts: dict[str, object] = {}
    samples: dict[str, list[dict[str, object]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        atlas = Path(tmp) / "atlas.db"
        shutil.copy(args.atlas, atlas)
        for w in weights:
            cpu0, wall0 = time.process_time(), time.perf_counter()
            meta = add_families(atlas, args.dict, FamilyConfig(cofire_weight=w), log=lambda m: print(m, flush=True))
            cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
            runs.append({"cofire_weight": w, "wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
                         "seconds": meta["seconds"], "live": meta["live"], "dead_excluded": meta["dead_excluded"],
                         "levels": meta["levels"], "quality": meta["quality"]})  # fmt: skip
            print(json.dumps(runs[-1]["quality"], indent=None), flush=True)
            if w == FamilyConfig().cofire_weight:
                conn = open_atlas(atlas)
                for li in (len(meta["levels"]) - 1, len(meta["levels"]) // 2):
                    rows = family_rows(conn, li, members=False)
                    shared = [r for r in rows if any(t["shared"] for t in r["terms"])]
                    mixed = [r for r in rows if not any(t["shared"] for t in r["terms"])]
                    keep = ("id", "size", "label", "cos_within", "cofire_within")
                    samples[f"level {li} labelled"] = [{k: r[k] for k in keep} for r in shared[:12]]
                    samples[f"level {li} mixed"] = [{k: r[k] for k in keep} for r in mixed[:4]]
                layouts = compare_layouts(conn, args.dict, meta)
                conn.close()
    result = {
        "atlas": str(args.atlas),
        "threads": args.threads,
        "load_before": round(load_before, 2),
        "load_after": round(os.getloadavg()[0], 2),
        "runs": runs,
        "samples": samples,
        "layouts": layouts,
        "command": " ".join([".venv/bin/python", "benchmarks/families.py", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, ensure_ascii=False))
    print(f"wrote {args.out}")


def compare_layouts(conn, dict_path, meta) -> dict[str, object]:  # type: ignore[no-untyped-def]
    """t-SNE (as stored) against a spectral embedding and the PCA start, on the stored finest families."""
    import numpy as np
    import scipy.sparse as sp
    from sklearn.manifold import spectral_embedding

    from lmscope.atlas.db import read
    from lmscope.atlas.db.families import cofire_lists, map_points
    from lmscope.atlas.families import (
        _dictionary_for,
        cofire_pairs,
        distance_matrix,
        map_agreement,
        map_neighbours,
        unit_rows,
    )

    d, _ = _dictionary_for(conn, Path("atlas"), dict_path)
    ids = read.live_feature_ids(conn)
    pts = map_points(conn)
    fam = np.array([p[3][-1] for p in pts])
    y_tsne = np.array([[p[1], p[2]] for p in pts])
    units = unit_rows(d.W_dec.detach().float().numpy()[ids])
    dist = distance_matrix(units, cofire_pairs(ids, cofire_lists(conn, ids)), meta["config"]["cofire_weight"])
    out: dict[str, object] = {"tsne": {"seconds": meta["seconds"]["layout"],
                                       "map_agreement": map_agreement(map_neighbours(y_tsne), fam)}}  # fmt: skip
    t = time.perf_counter()
    n, k = len(ids), 30
    np.fill_diagonal(dist, np.inf)
    nn = np.argpartition(dist, k, axis=1)[:, :k]
    np.fill_diagonal(dist, 0.0)
    rows = np.repeat(np.arange(n), k)
    dd = dist[rows, nn.ravel()].astype(np.float64)
    a = sp.csr_matrix((np.exp(-dd / np.median(dd)), (rows, nn.ravel())), shape=(n, n))
    y_spec = spectral_embedding(a.maximum(a.T), n_components=2, random_state=0, drop_first=True)
    out["spectral"] = {"seconds": round(time.perf_counter() - t, 2),
                       "map_agreement": map_agreement(map_neighbours(y_spec), fam)}  # fmt: skip
    t = time.perf_counter()
    u, s, _ = np.linalg.svd(units - units.mean(0), full_matrices=False)
    y_pca = u[:, :2] * s[:2]
    out["pca"] = {"seconds": round(time.perf_counter() - t, 2),
                  "map_agreement": map_agreement(map_neighbours(y_pca), fam)}  # fmt: skip
    print(json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    main()
