"""`lmscope transcoders` and `lmscope circuit` from the command line, on a tiny llama with a tokenizer: one
streaming pass trains every layer, a kill -9 resumes to the same weights, and a graph is built, written in the
viewer's schema, reloaded and checked by intervention."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from atlas_helpers import make_corpus
from lmscope.circuits import Graph, TranscoderSet
from lmscope.cli.app import app
from lmscope.dictionaries.formats import load_dictionary
from tiny_models import save_tiny_with_tokenizer

runner = CliRunner()
ARGS = ["--tokens", "6k", "--batch-size", "256", "--context", "32", "--k", "4", "--expansion", "2",
        "--eval-tokens", "1k", "--warmup-steps", "2"]  # fmt: skip


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("circuit-cli")
    model = Path(save_tiny_with_tokenizer("llama", str(root / "model")))
    corpus = make_corpus(root / "corpus", n_docs=300)
    tc = root / "tc"
    res = runner.invoke(app, ["transcoders", str(model), "--corpus", str(corpus), "--out", str(tc), *ARGS])
    assert res.exit_code == 0, res.output
    return {"root": root, "model": model, "corpus": corpus, "tc": tc}


def test_transcoders_train_every_layer_in_one_pass(setup: dict[str, Path]) -> None:
    info = json.loads((setup["tc"] / "transcoders.json").read_text())
    assert info["layers"] == [0, 1, 2] and info["tokens"] >= 6000
    ev = info["eval"]
    assert set(ev["fvu"]) == {"0", "1", "2"} and all(0 <= v < 10 for v in ev["fvu"].values())
    assert {"ce_clean", "ce_spliced", "ce_zero", "ce_recovered", "kl_spliced"} <= set(ev)
    tcs = TranscoderSet.load(setup["tc"])
    assert tcs.layers == [0, 1, 2]
    assert all(
        tcs[i].cfg.hook == f"blocks.{i}.mlp_in" and tcs[i].cfg.hook_out == f"blocks.{i}.mlp_out" for i in range(3)
    )


def _weights(d: Path) -> dict[str, torch.Tensor]:
    return {f"{i}/{k}": v for i in range(3) for k, v in load_dictionary(d / f"layer{i:02d}").state_dict().items()}


def test_kill_9_resumes_to_the_same_weights(setup: dict[str, Path], tmp_path: Path) -> None:
    args = [str(setup["model"]), "--corpus", str(setup["corpus"]), *ARGS, "--tokens", "16k", "--checkpoint-every", "3"]
    whole = tmp_path / "whole"
    assert runner.invoke(app, ["transcoders", *args, "--out", str(whole)]).exit_code == 0
    cut = tmp_path / "cut"
    cmd = [sys.executable, "-m", "lmscope.cli.app", "transcoders", *args, "--out", str(cut)]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONHASHSEED": "0"}
    )
    deadline = time.time() + 120
    while not (cut / "checkpoint.safetensors").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed; give it more tokens"
    assert not (cut / "layer00").exists()
    res = runner.invoke(app, ["transcoders", *args, "--out", str(cut)])
    assert res.exit_code == 0, res.output
    a, b = _weights(whole), _weights(cut)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_circuit_builds_writes_and_checks_a_graph(setup: dict[str, Path]) -> None:
    out = setup["root"] / "graphs" / "g.json"
    res = runner.invoke(app, ["circuit", str(setup["model"]), "--transcoders", str(setup["tc"]), "--prompt",
                              "The capital of France is", "--out", str(out)])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "replacement" in res.output and "completeness" in res.output
    doc = json.loads(out.read_text())
    assert {"metadata", "qParams", "nodes", "links"} <= set(doc)
    kinds = {n["feature_type"] for n in doc["nodes"]}
    assert {"embedding", "logit"} <= kinds
    ids = {n["node_id"] for n in doc["nodes"]}
    assert len(ids) == len(doc["nodes"])
    assert all(link["source"] in ids and link["target"] in ids for link in doc["links"])
    g = Graph.load(out.with_suffix(".safetensors"))
    node = next(n for n in range(g.n_features) if g.feat_layer[n] == 0)
    d = g.describe(node)
    iv = f"{d['layer']}:{d['feature']}:{d['pos']}=0"
    res = runner.invoke(app, ["circuit", str(setup["model"]), "--transcoders", str(setup["tc"]), "--graph",
                              str(out.with_suffix(".safetensors")), "--intervene", iv])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "graph predicts" in res.output and "constrained" in res.output


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--prompt", "x", "--target", " Paris and London"], "not one; a target must be a single token"),
        (["--prompt", "x " * 50, "--max-tokens", "8"], "at most 8"),
        ([], "exactly one of --prompt"),
        (["--prompt", "x", "--intervene", "1:2"], "LAYER:FEATURE:POS=VALUE"),
    ],
)
def test_circuit_bad_input_one_line(setup: dict[str, Path], extra: list[str], message: str) -> None:
    res = runner.invoke(app, ["circuit", str(setup["model"]), "--transcoders", str(setup["tc"]), *extra])
    assert res.exit_code == 2
    assert message in " ".join(res.output.split()), res.output


def test_transcoders_from_another_model_are_refused(setup: dict[str, Path], tmp_path: Path) -> None:
    other = Path(save_tiny_with_tokenizer("gpt2", str(tmp_path / "gpt2")))
    res = runner.invoke(app, ["circuit", str(other), "--transcoders", str(setup["tc"]), "--prompt", "x"])
    assert res.exit_code == 2
    assert "was trained on" in " ".join(res.output.split()), res.output


DDP_SCRIPT = """
import sys
from lmscope.circuits.train import TranscoderRecipe, train_transcoders
from lmscope.model.loading import load_model
from lmscope.training import distributed
device = distributed.init_from_env("cpu")
model = load_model(sys.argv[1], device="cpu", dtype="float32")
recipe = TranscoderRecipe(k=4, expansion=2, tokens=2048, batch_size=256, context=32, warmup_steps=2,
                          checkpoint_every=0, eval_tokens=512, norm_sample_tokens=1024, skip=True)
train_transcoders(model, sys.argv[2], sys.argv[3], recipe, device=device)
"""


def test_two_gloo_ranks_train_the_same_skip_transcoders_as_one_process(setup: dict[str, Path], tmp_path: Path) -> None:
    script = tmp_path / "tc.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [str(setup["model"]), str(setup["corpus"])]
    one = subprocess.run([sys.executable, str(script), *args, str(tmp_path / "one")], env=env, capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(script), *args, str(tmp_path / "two")], env=env, capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    for i in range(3):
        a = load_dictionary(tmp_path / "one" / f"layer{i:02d}").state_dict()
        b = load_dictionary(tmp_path / "two" / f"layer{i:02d}").state_dict()
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=f"layer {i} {k}")
    assert json.loads((tmp_path / "two" / "transcoders.json").read_text())["eval"]["fvu"]
    assert load_dictionary(tmp_path / "one" / "layer00").cfg.skip  # skip-transcoders, W_skip trained and folded
    assert float(load_dictionary(tmp_path / "one" / "layer00").W_skip.detach().abs().max()) > 0


KEEP_ALL = ["--node-threshold", "1", "--edge-threshold", "1"]


def test_atlas_over_a_transcoder_set_labels_graph_nodes(setup: dict[str, Path], tmp_path: Path) -> None:
    import sqlite3

    from lmscope.atlas import add_label

    atlases = tmp_path / "tc-atlas"
    res = runner.invoke(app, ["atlas", str(setup["model"]), "--dict", str(setup["tc"]), "--layers", "all",
                              "--corpus", str(setup["corpus"]), "--tokens", "2k", "--context", "32", "--out",
                              str(atlases), "--no-progress"])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in atlases.iterdir()) == ["layer00.db", "layer01.db", "layer02.db"]
    out = tmp_path / "g.json"
    res = runner.invoke(app, ["circuit", str(setup["model"]), "--transcoders", str(setup["tc"]), "--prompt",
                              "The capital of France is", "--out", str(out), *KEEP_ALL])  # fmt: skip
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    f = next(n for n in doc["nodes"] if n["feature_type"] == "cross layer transcoder")
    conn = sqlite3.connect(atlases / f"layer{int(f['layer']):02d}.db")
    add_label(conn, int(f["feature"]), "a hand-made label", source="human")
    conn.commit()
    conn.close()
    res = runner.invoke(app, ["circuit", str(setup["model"]), "--transcoders", str(setup["tc"]), "--graph",
                              str(out.with_suffix(".safetensors")), "--atlas", str(atlases), "--out", str(out),
                              *KEEP_ALL])  # fmt: skip
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    labelled = {n["node_id"]: n["clerp"] for n in doc["nodes"]}
    assert labelled[f["node_id"]] == "a hand-made label"
    # a second run keeps the atlases it has (resumable layer by layer)
    res = runner.invoke(app, ["atlas", str(setup["model"]), "--dict", str(setup["tc"]), "--layers", "0",
                              "--corpus", str(setup["corpus"]), "--tokens", "2k", "--out", str(atlases)])  # fmt: skip
    assert res.exit_code == 0 and "exists; kept" in res.output
