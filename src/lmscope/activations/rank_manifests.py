"""A harvest over several processes (torchrun): each rank records the shards it wrote in its own file, and rank 0
folds those records into the one manifest, atomically.

Shard j belongs to rank j mod N. Every rank reads the corpus in the same order and runs the model only on its own
shards' batches, so each shard file is the one a single process writes (same rows, same batches). A rank records a
shard in `manifest.rank{R}.json` once its file is complete; at the end (and at the start of a rerun after a kill),
rank 0 adds the records to `manifest.json` in shard order, up to the first shard that is missing or damaged, and
removes the rank files. A killed run therefore resumes from the longest complete prefix, as a single process does.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from lmscope.activations.format import MANIFEST, SHARD_FMT, check_shard, mean_norms
from lmscope.core.atomic import atomic_write_json

RANK_FILE = "manifest.rank{}.json"
_RANK_RE = re.compile(r"manifest\.rank(\d+)\.json")


def rank_file(rank: int) -> str:
    return RANK_FILE.format(rank)


def is_rank_file(name: str) -> bool:
    return bool(_RANK_RE.fullmatch(name))


def fold_rank_files(out: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """`manifest` with the shards recorded in the rank files added, kept up to the first gap or damaged shard;
    written to `out`/manifest.json, then the rank files are removed (rank 0 only)."""
    import json

    records = {int(s["file"][len("shard_") : -len(".safetensors")]): s for s in manifest["shards"]}
    files = sorted(p for p in out.iterdir() if is_rank_file(p.name))
    for p in files:
        for s in json.loads(p.read_text()).get("shards", []):
            records[int(s["file"][len("shard_") : -len(".safetensors")])] = s
    kept: list[dict[str, Any]] = []
    row = 0
    for i in range(len(records)):
        s = records.get(i)
        if s is None or s["file"] != SHARD_FMT.format(i) or s["first_row"] != row:
            break
        if check_shard(out, s, checksum=False) is not None:
            break
        kept.append(s)
        row += s["rows"]
    manifest["shards"] = kept
    manifest["tokens"] = row
    manifest["mean_norms"] = mean_norms(kept, manifest["hooks"]) if kept else {}
    atomic_write_json(out / MANIFEST, manifest)
    for p in files:
        p.unlink()
    return manifest
