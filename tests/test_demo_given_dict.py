"""`lmscope demo --dict`: the demo on someone else's dictionary (here a SAELens copy of a SmolLM2 one) imports it
in place of the harvest and training stages, checks it against the model, re-imports it when the source changes,
and refuses contradictory options with one line each."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from lmscope.atlas.db.read import feature_counts
from lmscope.atlas.schema import open_atlas
from lmscope.cli.app import app
from lmscope.dictionaries import DictConfig, build
from lmscope.dictionaries.formats import dictionary_hash, load_dictionary, save_dictionary
from lmscope.dictionaries.pretrained import convert_dictionary
from lmscope.errors import LmscopeError
from lmscope.workflows.demo import IMPORTED, Demo, DemoConfig
from lmscope.workflows.pipeline import Pipeline

runner = CliRunner()


def test_demo_on_a_saelens_dictionary_imports_it_instead_of_training(smollm2, smollm2_sae, tmp_path: Path) -> None:
    src = convert_dictionary(smollm2_sae.dict_dir(), "saelens", tmp_path / "theirs")
    cfg = DemoConfig(dictionary=str(src), eval_tokens=1_024, atlas_tokens=2_048, explain_limit=8)
    job = Demo(cfg, tmp_path / "run", device="cpu")
    job._model = smollm2
    stages = job.stages()
    assert [s.name for s in stages][:4] == ["import", "eval", "atlas", "explain"]
    assert "harvest" not in {s.name for s in stages} and "train" not in {s.name for s in stages}
    Pipeline(job.run_dir, asdict(cfg), stages[:4]).run()
    assert job.dict_dir() == job.run_dir / IMPORTED and job.hook == "blocks.6.resid_post"
    original = smollm2_sae.dictionary()
    assert dictionary_hash(load_dictionary(job.dict_dir())) == dictionary_hash(original)
    conn = open_atlas(job.run_dir / "atlas.db", readonly=True)
    try:
        assert feature_counts(conn)[0] == original.cfg.d_sae
    finally:
        conn.close()
    rerun = Pipeline(job.run_dir, asdict(cfg), job.stages()[:2]).run()
    assert [o.skipped for o in rerun] == [True, True]

    # The source changes: the imported copy no longer verifies, so import (and what follows) runs again.
    changed = build(DictConfig(arch="topk", d_in=576, d_sae=original.cfg.d_sae, k=32, hook="blocks.6.resid_post"), 5)
    save_dictionary(changed, tmp_path / "lm")
    convert_dictionary(tmp_path / "lm", "saelens", tmp_path / "theirs2")
    for f in (tmp_path / "theirs2").iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    job2 = Demo(cfg, tmp_path / "run", device="cpu")
    job2._model = smollm2
    again = Pipeline(job2.run_dir, asdict(cfg), job2.stages()[:1]).run()
    assert again[0].skipped is False
    assert dictionary_hash(load_dictionary(job2.dict_dir())) == dictionary_hash(changed)


def test_demo_refuses_a_dictionary_for_another_model_width(smollm2, tmp_path: Path) -> None:
    d = build(DictConfig(arch="topk", d_in=64, d_sae=128, k=4, hook="blocks.2.resid_post"), 0)
    save_dictionary(d, tmp_path / "narrow")
    job = Demo(DemoConfig(dictionary=str(tmp_path / "narrow")), tmp_path / "run", device="cpu")
    job._model = smollm2
    with pytest.raises(LmscopeError, match=r"64-wide .* 576 wide"):
        job.import_dictionary(job.run_dir)
    assert not (job.run_dir / IMPORTED).exists()


def test_demo_dict_options_that_contradict_get_one_line(tmp_path: Path) -> None:
    d = build(DictConfig(arch="topk", d_in=8, d_sae=16, k=2, hook="blocks.1.resid_post"), 0)
    save_dictionary(d, tmp_path / "d")
    r = runner.invoke(app, ["demo", "--dict-hook", "blocks.1.resid_post", "--no-serve", "--run-dir", str(tmp_path)])
    assert r.exit_code == 2 and "pass --dict too" in r.output
    r = runner.invoke(app, ["demo", "--dict", str(tmp_path / "missing"), "--no-serve", "--run-dir", str(tmp_path)])
    assert r.exit_code == 2 and "does not exist" in r.output
    with pytest.raises(LmscopeError, match="drop --layer"):
        Demo(DemoConfig(dictionary=str(tmp_path / "d"), layer=3), tmp_path / "run")
    unnamed = build(DictConfig(arch="topk", d_in=8, d_sae=16, k=2), 0)
    save_dictionary(unnamed, tmp_path / "nohook")
    job = Demo(DemoConfig(dictionary=str(tmp_path / "nohook")), tmp_path / "run")
    with pytest.raises(LmscopeError, match="pass --dict-hook"):
        _ = job.hook
    assert torch.equal(load_dictionary(tmp_path / "d").W_enc, d.W_enc)  # nothing was written over
