"""An atlas built by 2 gloo ranks under torchrun equals the one process builds: every example, window, quantile
sample, histogram, count, context, source and co-firing neighbour; the activation sums to float rounding. And the
accumulator merge on its own: two halves of a stream merged equal the whole stream, in either order."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from atlas_helpers import table_rows
from lmscope.atlas.accumulate import FeatureAccumulator

SCRIPT = textwrap.dedent(
    """
    import sys
    from lmscope.atlas import AtlasConfig, build_atlas
    from lmscope.model.loading import load_model
    from lmscope.training import distributed

    distributed.init_from_env("cpu")
    model = load_model(sys.argv[1], device="cpu", dtype="float32")
    cfg = AtlasConfig(tokens=1536, context=32, batch_size=3, top_k=5, bins=8, samples_per_bin=3, hist_bins=16)
    build_atlas(model, sys.argv[2], sys.argv[3], out=sys.argv[4], config=cfg, progress=False)
    """
)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from atlas_helpers import make_corpus, tiny_dictionary
    from lmscope.dictionaries.formats import save_dictionary
    from tiny_models import save_tiny_with_tokenizer

    root = tmp_path_factory.mktemp("dist")
    model = save_tiny_with_tokenizer("llama", str(root / "model"))
    save_dictionary(tiny_dictionary(), root / "dict")
    corpus = make_corpus(root / "corpus")
    script = root / "build.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [model, str(root / "dict"), str(corpus)]
    one = subprocess.run([sys.executable, str(script), *args, str(root / "one.db")], env=env, capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(script), *args, str(root / "two.db")], env=env, capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    return root / "one.db", root / "two.db"


def test_two_ranks_build_the_same_atlas_as_one_process(built: tuple[Path, Path]) -> None:
    one, two = built
    assert not Path(f"{two}.partial").exists()
    for sql in (
        "SELECT id, tokens FROM contexts ORDER BY id",
        "SELECT context, start, source FROM context_sources ORDER BY context, start",
        "SELECT feature, kind, bin, rank, context, pos, act, start, acts, peak_token, text FROM examples "
        "ORDER BY feature, kind, bin, rank",
        "SELECT * FROM quantile_bins ORDER BY feature, bin",
        "SELECT id, n_fired, density, max_act, dead, hist, logits, neighbours, cofire FROM features ORDER BY id",
    ):
        a, b = table_rows(one, sql), table_rows(two, sql)
        assert len(a) > 0 and a == b, sql
    ma = table_rows(one, "SELECT id, mean_act FROM features ORDER BY id")
    mb = table_rows(two, "SELECT id, mean_act FROM features ORDER BY id")
    assert all(x[0] == y[0] and x[1] == pytest.approx(y[1], rel=1e-12, abs=1e-12) for x, y in zip(ma, mb, strict=True))
    meta = {k: json.loads(v) for k, v in table_rows(one, "SELECT key, value FROM meta")}
    meta2 = {k: json.loads(v) for k, v in table_rows(two, "SELECT key, value FROM meta")}
    assert meta["metrics"]["atlas"] == meta2["metrics"]["atlas"], "FVU, L0, dead: replayed in batch order"
    assert meta2["provenance"]["ranks"] == 2 and meta["provenance"]["ranks"] == 1
    n_examples = table_rows(one, "SELECT count(*) FROM examples WHERE kind = 'quantile'")[0][0]
    assert n_examples > 50, "the tiny build must exercise the quantile samples"


def _stream(seed: int, n: int = 12, B: int = 2, C: int = 16, F: int = 24) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        scale = 1.0 + 3.0 * i  # maxima grow along the stream: S doubles, bins merge
        z = torch.relu(torch.randn(B, C, F, generator=g) * scale - 0.5 * scale)
        special = torch.zeros(B, C, dtype=torch.bool)
        special[:, 0] = True
        out.append((z, special))
    return out


def test_merging_two_halves_equals_the_whole_stream_in_either_order() -> None:
    batches = _stream(0)

    def acc_of(idx: list[int]) -> FeatureAccumulator:
        acc = FeatureAccumulator(24, top_k=4, bins=8, samples=2, hist_bins=16, before=3, after=2, seed=7)
        for i in idx:
            z, special = batches[i]
            acc.update(z, special, torch.arange(2 * i, 2 * i + 2))
        return acc

    whole = acc_of(list(range(12)))
    for first, second in ((range(0, 12, 2), range(1, 12, 2)), (range(1, 12, 2), range(0, 12, 2))):
        a, b = acc_of(list(first)), acc_of(list(second))
        a.merge(b)
        names = ["n_tokens", *FeatureAccumulator.STATE, *("top." + e for e in FeatureAccumulator.EXAMPLES),
                 *("q." + e for e in FeatureAccumulator.EXAMPLES)]  # fmt: skip
        for name, x, y in zip(names, whole.state(), a.state(), strict=True):
            if name == "sum_act":
                torch.testing.assert_close(y, x, rtol=1e-12, atol=1e-12)
            else:
                assert torch.equal(x, y), name
    with pytest.raises(ValueError, match="different settings"):
        whole.merge(FeatureAccumulator(24, top_k=3, bins=8, samples=2, hist_bins=16, before=3, after=2, seed=7))


def test_lmscope_atlas_runs_under_torchrun_and_rank_0_reports(built: tuple[Path, Path]) -> None:
    root = built[0].parent
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
                        "lmscope.cli.app", "atlas", str(root / "model"), "--dict", str(root / "dict"), "--corpus",
                        str(root / "corpus"), "--tokens", "1024", "--context", "32", "--batch-size", "2",
                        "--out", str(root / "cli.db"), "--device", "cpu", "--no-progress"],
                       env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("done") == 1, r.stdout
    meta = {k: json.loads(v) for k, v in table_rows(root / "cli.db", "SELECT key, value FROM meta")}
    assert meta["provenance"]["ranks"] == 2 and meta["complete"] == 1
