"""`lmscope train` end to end on a tiny harvest: a sweep, a transcoder, resume, and the parsing helpers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from harvest_helpers import load_tiny, make_corpus_dir, make_tiny_model_dir
from lmscope.activations import HarvestConfig, harvest
from lmscope.cli.app import app
from lmscope.cli.common import parse_count
from lmscope.cli.train_cmds import parse_list
from lmscope.dictionaries.formats import load_dictionary, save_dictionary
from lmscope.errors import LmscopeError
from lmscope.training import Trainer
from lmscope.training.checkpoint import CHECKPOINT, load_checkpoint
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
    log = read_log(tmp_path / "sweep" / "metrics.jsonl")
    assert sorted((r["run"], r["step"]) for r in log) == [(f"{HOOKS[0]}-topk-m64-k{k}", 8) for k in (4, 8)]  # 2048/256
    before = _outputs(tmp_path / "sweep")
    _, meta = load_checkpoint(tmp_path / "sweep" / CHECKPOINT)
    assert (meta["step"], meta["tokens"]) == (8, 2048)
    trained: list[int] = []
    real_step = Trainer._train_step

    def counting_step(self, run, *a, **kw):  # type: ignore[no-untyped-def]
        trained.append(self.step)
        return real_step(self, run, *a, **kw)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(Trainer, "_train_step", counting_step)
        again = CliRunner().invoke(app, args)  # finished checkpoint: resumes and stops at once
    assert again.exit_code == 0, again.output
    assert trained == []  # not one step redone
    # the log has no new or duplicated step, and the checkpoint and dictionaries are what the first run wrote
    assert _same(_outputs(tmp_path / "sweep"), before)


def _outputs(out: Path) -> dict[str, object]:
    """What a training run leaves: the metrics log, the checkpoint's tensors and step, and every dictionary."""
    tensors, meta = load_checkpoint(out / CHECKPOINT)
    got: dict[str, object] = {
        "log": (out / "metrics.jsonl").read_bytes(),
        "meta": (meta["step"], meta["tokens"], meta["total_steps"]),
        "checkpoint": {k: v.clone() for k, v in tensors.items()},
    }
    for d in sorted(out.glob("*/dictionary.safetensors")):
        got[d.parent.name] = (d.read_bytes(), (d.parent / "config.json").read_bytes())
    return got


def _same(a: dict[str, object], b: dict[str, object]) -> bool:
    if a.keys() != b.keys():
        return False
    for key in a:
        x, y = a[key], b[key]
        if isinstance(x, dict):
            assert isinstance(y, dict)
            if x.keys() != y.keys() or not all(torch.equal(x[k], y[k]) for k in x):
                return False
        elif x != y:
            return False
    return True


def test_train_cli_resumes_an_interrupted_run_without_redoing_a_step(acts: Path, tmp_path: Path) -> None:
    """Interrupted right after its step-4 checkpoint, a rerun of the same command trains steps 5-8 only and
    ends bit-identical to an uninterrupted run."""

    def args(out: Path) -> list[str]:
        return ["train", "--acts", str(acts), "--out", str(out), "--hook", HOOKS[0], "--k", "4",
                "--expansion", "2", "--tokens", "2k", "--batch-size", "256", "--warmup-steps", "2",
                "--checkpoint-every", "4", "--no-progress"]  # fmt: skip

    straight = CliRunner().invoke(app, args(tmp_path / "straight"))
    assert straight.exit_code == 0, straight.output
    real_save, real_step = Trainer.save_checkpoint, Trainer._train_step

    def save_then_die(self):  # type: ignore[no-untyped-def]
        real_save(self)
        if self.step == 4:
            raise KeyboardInterrupt("killed after the step-4 checkpoint")

    with pytest.MonkeyPatch.context() as m:
        m.setattr(Trainer, "save_checkpoint", save_then_die)
        killed = CliRunner().invoke(app, args(tmp_path / "resumed"))
    assert killed.exit_code == 130, killed.output  # the CLI turns Ctrl-C into exit status 130
    assert load_checkpoint(tmp_path / "resumed" / CHECKPOINT)[1]["step"] == 4
    assert not list((tmp_path / "resumed").glob("*/dictionary.safetensors"))  # nothing final yet
    # another batch size would skip the wrong rows and follow another schedule: refused, the checkpoint kept
    checkpoint = (tmp_path / "resumed" / CHECKPOINT).read_bytes()
    other = [*args(tmp_path / "resumed")]
    other[other.index("--batch-size") + 1] = "128"
    refused = CliRunner().invoke(app, other)
    assert refused.exit_code != 0 and "trained on batches of 256 tokens but this run's are 128" in refused.output
    assert "Traceback" not in refused.output
    assert (tmp_path / "resumed" / CHECKPOINT).read_bytes() == checkpoint
    trained: list[int] = []

    def counting_step(self, run, *a, **kw):  # type: ignore[no-untyped-def]
        trained.append(self.step)
        return real_step(self, run, *a, **kw)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(Trainer, "_train_step", counting_step)
        resumed = CliRunner().invoke(app, args(tmp_path / "resumed"))
    assert resumed.exit_code == 0, resumed.output
    assert trained == [4, 5, 6, 7]  # the steps after the checkpoint (0-based), each once
    a, b = _outputs(tmp_path / "straight"), _outputs(tmp_path / "resumed")
    log_a, log_b = read_log(tmp_path / "straight" / "metrics.jsonl"), read_log(tmp_path / "resumed" / "metrics.jsonl")
    assert [(r["run"], r["step"]) for r in log_b] == [(r["run"], r["step"]) for r in log_a]  # no duplicated step
    # (the logged means cover the steps since the last log line, which the resumed run did not all take, and
    # tok_s differs: the log is compared by its steps above, the weights bit for bit here)
    a.pop("log"), b.pop("log")
    assert _same(a, b)


def test_a_corrupt_shard_met_while_mapping_stops_training_with_one_clear_line(acts: Path, tmp_path: Path) -> None:
    """Shards are mapped and verified two at a time on pool threads (activations/store.py `_Window`): a checksum
    failure there still reaches the command as the store's own error, naming the shard and the fix, with no
    traceback and no dictionary written."""
    import shutil

    bad = tmp_path / "acts"
    shutil.copytree(acts, bad)
    shards = sorted(bad.glob("shard_*.safetensors"))
    data = bytearray(shards[-1].read_bytes())
    data[-5] ^= 0xFF  # same size, other bytes: only the checksum can tell
    shards[-1].write_bytes(bytes(data))
    args = ["train", "--acts", str(bad), "--out", str(tmp_path / "out"), "--hook", HOOKS[0], "--k", "4",
            "--expansion", "2", "--tokens", "8k", "--batch-size", "256", "--warmup-steps", "2", "--epochs", "2",
            "--no-progress"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code != 0
    assert shards[-1].name in result.output and "lmscope verify" in result.output, result.output
    assert "Traceback" not in result.output
    assert not list((tmp_path / "out").glob("*/dictionary.safetensors"))


def test_train_transcoder_and_clean_errors(acts: Path, tmp_path: Path) -> None:
    args = ["train", "--acts", str(acts), "--out", str(tmp_path / "tc"), "--hook", HOOKS[0], "--hook-out", HOOKS[1],
            "--k", "4", "--expansion", "2", "--tokens", "1k", "--batch-size", "256"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    d = load_dictionary(tmp_path / "tc" / f"{HOOKS[0]}-topk-m64-k4")
    assert d.cfg.is_transcoder and d.cfg.hook_out == HOOKS[1]
    bad = CliRunner().invoke(app, ["train", "--acts", str(acts), "--out", str(tmp_path / "x"), "--arch", "gated"])
    assert bad.exit_code == 2 and "unknown --arch 'gated'" in bad.output


def test_train_to_a_target_l0_matryoshka_and_health_lines(acts: Path, tmp_path: Path) -> None:
    base = ["train", "--acts", str(acts), "--hook", HOOKS[0], "--expansion", "2", "--tokens", "2k", "--batch-size",
            "256", "--warmup-steps", "2"]  # fmt: skip
    # without the TopK phase (with it the 8 steps would be a TopK at k = 8, on target and healthy)
    result = CliRunner().invoke(
        app, [*base, "--out", str(tmp_path / "t"), "--arch", "relu", "--target-l0", "8", "--topk-phase", "0"]
    )
    assert result.exit_code == 0, result.output
    d = load_dictionary(tmp_path / "t" / f"{HOOKS[0]}-relu-m64-l0target_8")
    assert d.cfg.target_l0 == 8 and d.cfg.l1_coeff == d.metadata["training"]["sparsity_control"]["coeff"]
    assert d.cfg.token_topk_frac == 0.0
    said = " ".join(result.output.split())  # rich wraps long lines
    assert "l0target_8 health: L0 " in said  # 8 steps are too few for the controller: the health line says so,
    assert f"{HOOKS[0]}-relu-m64-l0target_8: warning: L0 " in said  # the warning came as it was raised
    assert "coeff" in read_log(tmp_path / "t" / "metrics.jsonl")[-1]
    x = str(tmp_path / "x")
    both = CliRunner().invoke(app, [*base, "--out", x, "--arch", "relu", "--l1", "3", "--target-l0", "8"])
    assert both.exit_code == 2 and "both --l1 and --target-l0 given" in both.output
    topk = CliRunner().invoke(app, [*base, "--out", x, "--target-l0", "8"])
    assert topk.exit_code == 2 and "--arch topk sets its L0 with --k" in topk.output
    m_out = str(tmp_path / "m")
    m = CliRunner().invoke(
        app, [*base, "--out", m_out, "--arch", "matryoshka", "--k", "4", "--matryoshka-groups", "16,16,32"]
    )
    assert m.exit_code == 0, m.output
    mat = load_dictionary(tmp_path / "m" / f"{HOOKS[0]}-matryoshka-m64-k4")
    assert mat.cfg.matryoshka_groups == [16, 16, 32] and mat.prefixes == [16, 32, 64] and float(mat.threshold) > 0
    bad = CliRunner().invoke(app, [*base, "--out", x, "--arch", "matryoshka", "--matryoshka-groups", "0.5,0.25"])
    assert bad.exit_code == 2 and "matryoshka_groups=[0.5, 0.25] sums to 0.75" in bad.output
    # a sick dictionary (its decoder ten times too long): `lmscope eval` says so, and eval.json keeps the warnings
    with torch.no_grad():
        mat.W_dec.mul_(10)
    save_dictionary(mat, tmp_path / "sick")
    model, corpus = acts.parent / "model", acts.parent / "corpus"
    ev = CliRunner().invoke(app, ["eval", str(model), "--dict", str(tmp_path / "sick"), "--corpus", str(corpus),
                                  "--tokens", "64", "--context", "16", "--device", "cpu"])  # fmt: skip
    assert ev.exit_code == 0, ev.output
    assert "warning: FVU " in ev.output and "health: 1 warning(s)" in ev.output
    saved = json.loads((tmp_path / "sick" / "eval.json").read_text())
    assert len(saved["warnings"]) == 1 and saved["warnings"][0].startswith("FVU ")
