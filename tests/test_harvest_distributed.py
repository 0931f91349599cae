"""A harvest by 2 gloo ranks under torchrun writes the store one process writes: the same shard files, byte for
byte, and the same manifest records; and a killed multi-rank run keeps its longest complete prefix of shards."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lmscope.activations.format import MANIFEST
from lmscope.activations.rank_manifests import fold_rank_files, rank_file


def _harvest(args: list[str], ranks: int, out: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cli = ["-m", "lmscope.cli.app", "harvest", *args, "--out", str(out), "--no-progress", "--device", "cpu"]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)]
    cmd = [*launcher, *cli] if ranks > 1 else [sys.executable, *cli]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, subprocess.CompletedProcess[str]]:
    from atlas_helpers import make_corpus
    from tiny_models import save_tiny_with_tokenizer

    root = tmp_path_factory.mktemp("hv")
    model = save_tiny_with_tokenizer("llama", str(root / "model"))
    corpus = make_corpus(root / "corpus")
    args = [model, "--corpus", str(corpus), "--hooks", "blocks.1.resid_post,blocks.0.mlp_out", "--tokens", "1600",
            "--context", "32", "--batch-size", "2", "--shard-tokens", "192"]  # fmt: skip
    one = _harvest(args, 1, root / "one")
    assert one.returncode == 0, one.stderr[-3000:]
    two = _harvest(args, 2, root / "two")
    assert two.returncode == 0, two.stderr[-3000:]
    return root / "one", root / "two", two


Stores = tuple[Path, Path, subprocess.CompletedProcess[str]]


def test_two_ranks_write_the_store_one_process_writes(stores: Stores) -> None:
    one, two, run = stores
    m1, m2 = (json.loads((d / MANIFEST).read_text()) for d in (one, two))
    assert len(m1["shards"]) >= 4 and m1["shards"] == m2["shards"], "the same shards, rows and checksums"
    assert m1["tokens"] == m2["tokens"] and m2["complete"] and m1["mean_norms"] == m2["mean_norms"]
    for s in m1["shards"]:
        assert (one / s["file"]).read_bytes() == (two / s["file"]).read_bytes(), s["file"]
    assert not list(two.glob("manifest.rank*.json")), "rank files are folded into the manifest and removed"
    assert run.stdout.count("tokens") >= 1 and run.stdout.count("wrote") <= 1


def test_a_killed_multi_rank_run_keeps_its_complete_prefix(stores: Stores, tmp_path: Path) -> None:
    one = stores[0]
    m = json.loads((one / MANIFEST).read_text())
    for s in m["shards"]:
        (tmp_path / s["file"]).write_bytes((one / s["file"]).read_bytes())
    # rank 0 recorded shards 0 and 2, rank 1 only shard 1 before the kill: 3 and later are lost; shard 2 is kept
    (tmp_path / rank_file(0)).write_text(json.dumps({"shards": [m["shards"][0], m["shards"][2]]}))
    (tmp_path / rank_file(1)).write_text(json.dumps({"shards": [m["shards"][1]]}))
    folded = fold_rank_files(tmp_path, {**m, "shards": []})
    assert folded["shards"] == m["shards"][:3] and folded["tokens"] == sum(s["rows"] for s in m["shards"][:3])
    assert not list(tmp_path.glob("manifest.rank*.json"))
    # a gap (shard 1 never recorded) keeps only shard 0
    (tmp_path / rank_file(0)).write_text(json.dumps({"shards": [m["shards"][0], m["shards"][2]]}))
    assert fold_rank_files(tmp_path, {**m, "shards": []})["shards"] == m["shards"][:1]
