"""`lmscope train` end to end on a tiny harvest: a sweep, a transcoder, resume, and the parsing helpers."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from harvest_helpers import load_tiny, make_corpus_dir, make_tiny_model_dir
from lmscope.activations import HarvestConfig, harvest
from lmscope.cli.app import app
from lmscope.cli.common import parse_count
from lmscope.cli.train_cmds import parse_list
from lmscope.dictionaries.formats import load_dictionary
from lmscope.errors import LmscopeError
from lmscope.training.metrics import read_log

HOOKS = ["blocks.0.resid_post", "blocks.1.mlp_out"]


@pytest.fixture(scope="module")
def acts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("train_cli")
    model = load_tiny(make_tiny_model_dir(root / "model"))
    corpus = make_corpus_dir(root / "corpus", n_docs=20)
    cfg = HarvestConfig(hooks=HOOKS, tokens=4096, context=16, batch_size=8, shard_tokens=1024, dtype="float32")
    harvest(model, str(corpus), root / "acts", cfg, progress=False)
    return root / "acts"


def test_parsers() -> None:
    assert parse_count("20M") == 20_000_000 and parse_count("1.5k") == 1500 and parse_count("4096") == 4096
    assert parse_list("16,32,64", int) == [16, 32, 64]
    with pytest.raises(LmscopeError, match="cannot read 'lots'"):
        parse_count("lots")


def test_train_sweep_from_a_harvest(acts: Path, tmp_path: Path) -> None:
    args = ["train", "--acts", str(acts), "--out", str(tmp_path / "sweep"), "--hook", HOOKS[0], "--k", "4,8",
            "--expansion", "2", "--tokens", "2k", "--batch-size", "256", "--warmup-steps", "2"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    for k in (4, 8):
        d = load_dictionary(tmp_path / "sweep" / f"{HOOKS[0]}-topk-m64-k{k}")
        assert d.cfg.hook == HOOKS[0] and d.cfg.d_sae == 64 and d.cfg.k == k
        assert d.metadata["normalization"]["kind"] == "mean_norm"
    steps = [r["step"] for r in read_log(tmp_path / "sweep" / "metrics.jsonl")]
    assert max(steps) == 8  # 2048 tokens / 256
    again = CliRunner().invoke(app, args)  # finished checkpoint: resumes and stops at once
    assert again.exit_code == 0, again.output


def test_train_transcoder_and_clean_errors(acts: Path, tmp_path: Path) -> None:
    args = ["train", "--acts", str(acts), "--out", str(tmp_path / "tc"), "--hook", HOOKS[0], "--hook-out", HOOKS[1],
            "--k", "4", "--expansion", "2", "--tokens", "1k", "--batch-size", "256"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    d = load_dictionary(tmp_path / "tc" / f"{HOOKS[0]}-topk-m64-k4")
    assert d.cfg.is_transcoder and d.cfg.hook_out == HOOKS[1]
    bad = CliRunner().invoke(app, ["train", "--acts", str(acts), "--out", str(tmp_path / "x"), "--arch", "gated"])
    assert bad.exit_code == 2 and "unknown --arch 'gated'" in bad.output
