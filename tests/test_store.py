"""ActivationStore: exactly-once shuffling under a memory bound, exclusions, norms, multi-hook, streaming."""

from __future__ import annotations

import contextlib
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from harvest_helpers import load_tiny, make_corpus_dir, make_tiny_model_dir
from lmscope.activations import HarvestConfig, HarvestError, harvest
from lmscope.activations.store import ActivationStore

# resid_pre of block 1 is resid_post of block 0: equal tensors prove that hooks share rows in a batch
HOOKS = ["blocks.0.resid_post", "blocks.1.resid_pre", "blocks.1.mlp_out"]


@pytest.fixture(scope="module")
def harvested(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("store")
    model = load_tiny(make_tiny_model_dir(root / "model"))
    corpus = make_corpus_dir(root / "corpus", n_docs=20)
    cfg = HarvestConfig(hooks=HOOKS, tokens=4096, context=16, batch_size=8, shard_tokens=512, dtype="float32")
    harvest(model, str(corpus), root / "acts", cfg, progress=False)
    return model, corpus, root / "acts"


def all_rows(store: ActivationStore, hook: str) -> torch.Tensor:
    return torch.cat([store.read_shard(i)[hook] for i in range(len(store.manifest["shards"]))])


def row_keys(t: torch.Tensor) -> Counter:
    return Counter(bytes(r.numpy().tobytes()) for r in t)


def test_every_row_exactly_once_per_epoch_under_the_memory_bound(harvested) -> None:
    _, _, acts = harvested
    store = ActivationStore.open(acts, hooks=["blocks.1.mlp_out"], exclude_special=False)
    expected = row_keys(all_rows(store, "blocks.1.mlp_out"))
    # a multiset of rows: equal Counters mean every row came back as often as it is stored (once)
    assert sum(expected.values()) == store.n_rows == 4096 and len(expected) > 3000
    bound_mb = 0.1  # 100 kB, a fifth of the 524 kB of activations
    batches = list(store.batches(batch_size=64, buffer_mb=bound_mb, epochs=2, seed=3))
    assert store.peak_buffer_bytes <= bound_mb * 1e6
    assert store.peak_buffer_bytes > 0
    rows = torch.cat([b["blocks.1.mlp_out"] for b in batches])
    assert len(rows) == 2 * 4096 and all(len(b["blocks.1.mlp_out"]) == 64 for b in batches)
    first, second = rows[:4096], rows[4096:]
    assert row_keys(first) == expected and row_keys(second) == expected
    sequential = all_rows(store, "blocks.1.mlp_out")
    assert not torch.equal(first, sequential) and not torch.equal(first, second)  # shuffled, per epoch
    again = torch.cat([b["blocks.1.mlp_out"] for b in store.batches(batch_size=64, buffer_mb=bound_mb, seed=3)])
    assert torch.equal(again, first)  # deterministic for a seed
    with pytest.raises(HarvestError, match="too small"):
        next(store.batches(batch_size=4096, buffer_mb=0.1))


def test_unshuffled_batches_are_the_shards_in_order(harvested) -> None:
    _, _, acts = harvested
    store = ActivationStore.open(acts, exclude_special=False)
    got = list(store.batches(batch_size=100, shuffle=False, with_tokens=True, buffer_mb=1))
    assert [len(b["tokens"]) for b in got][-1] == 4096 % 100
    for h in HOOKS:
        assert torch.equal(torch.cat([b[h] for b in got]), all_rows(store, h))


def test_special_tokens_excluded_when_asked(harvested) -> None:
    model, _, acts = harvested
    special_ids = set(model.tokenizer.all_special_ids)
    kept = ActivationStore.open(acts, exclude_special=True)
    everything = ActivationStore.open(acts, exclude_special=False)
    tok_kept = torch.cat([b["tokens"] for b in kept.batches(batch_size=256, with_tokens=True)])
    tok_all = torch.cat([b["tokens"] for b in everything.batches(batch_size=256, with_tokens=True)])
    assert len(tok_all) == 4096 and len(tok_kept) == kept.n_rows < 4096
    assert not set(tok_kept.tolist()) & special_ids
    assert (tok_all == model.tokenizer.bos_token_id).sum() >= 4096 // 16  # a BOS at every context start
    assert Counter(tok_all.tolist()) - Counter(tok_kept.tolist()) == Counter(
        t for t in tok_all.tolist() if t in special_ids
    )


def test_mean_norm_and_multi_hook_batches(harvested) -> None:
    _, _, acts = harvested
    store = ActivationStore.open(acts)
    rows = torch.cat([b["blocks.1.mlp_out"] for b in store.batches(batch_size=512)])
    assert store.mean_norm("blocks.1.mlp_out") == pytest.approx(rows.double().norm(dim=-1).mean().item(), rel=1e-6)
    assert set(store.mean_norms()) == set(HOOKS) and store.d_model == 32
    for b in store.batches(batch_size=300, seed=1):
        assert torch.equal(b["blocks.0.resid_post"], b["blocks.1.resid_pre"])
        assert b["blocks.1.mlp_out"].shape == (len(b["blocks.0.resid_post"]), 32)
    with pytest.raises(HarvestError, match="has no activations for"):
        ActivationStore.open(acts, hooks=["blocks.0.attn_out"])


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under `root` with its size and mtime: a change anywhere shows up as a difference."""
    return {str(q.relative_to(root)): (q.stat().st_size, q.stat().st_mtime_ns) for q in root.rglob("*")}


@contextlib.contextmanager
def _no_writes(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Fail at once on any attempt to open a file for writing, however it is made (open, io.open, Path.open,
    os.open, safetensors, torch.save all go through these)."""
    import builtins
    import io
    import os

    real_open, real_os_open = builtins.open, os.open
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def guarded_open(file, mode="r", *args, **kwargs):  # type: ignore[no-untyped-def]
        if any(c in mode for c in "wax+"):
            raise AssertionError(f"the streaming store opened {file!r} for writing (mode {mode!r})")
        return real_open(file, mode, *args, **kwargs)

    def guarded_os_open(path, flags, *args, **kwargs):  # type: ignore[no-untyped-def]
        if flags & write_flags:
            raise AssertionError(f"the streaming store opened {path!r} for writing")
        return real_os_open(path, flags, *args, **kwargs)

    def refuse(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError(f"the streaming store tried to write {args[:2]!r}")

    import safetensors.torch

    with monkeypatch.context() as m:
        m.setattr(builtins, "open", guarded_open)
        m.setattr(io, "open", guarded_open)
        m.setattr(os, "open", guarded_os_open)
        for name in ("replace", "rename", "mkdir", "makedirs"):
            m.setattr(os, name, refuse)
        m.setattr(safetensors.torch, "save_file", refuse)
        m.setattr(torch, "save", refuse)
        yield


def test_streaming_matches_the_disk_store(harvested, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, corpus, acts = harvested
    disk = ActivationStore.open(acts, exclude_special=False)
    disk_norms = ActivationStore.open(acts).mean_norms()  # the harvest's own norms, read before the guard
    expected = {h: all_rows(disk, h) for h in HOOKS}
    # every place a stray write could land: the harvest's folders, the cwd, $HOME, lmscope's cache, the temp dir
    sandbox = tmp_path / "sandbox"
    for d in ("cwd", "home", "cache", "tmp"):
        (sandbox / d).mkdir(parents=True)
    monkeypatch.chdir(sandbox / "cwd")
    monkeypatch.setenv("HOME", str(sandbox / "home"))
    monkeypatch.setenv("LMSCOPE_CACHE", str(sandbox / "cache"))
    monkeypatch.setenv("TMPDIR", str(sandbox / "tmp"))
    monkeypatch.setattr(tempfile, "tempdir", str(sandbox / "tmp"))
    watched = [acts, corpus, acts.parent / "model", tmp_path]
    before = {str(w): _tree(w) for w in watched}
    with _no_writes(monkeypatch):
        stream = ActivationStore.streaming(
            model, str(corpus), HOOKS, tokens=4096, context=16, batch_contexts=8, exclude_special=False
        )
        assert stream.n_rows is None and stream.widths == disk.widths
        got = list(stream.batches(batch_size=128, shuffle=False, buffer_mb=1))
        shuffled = torch.cat([b["blocks.1.mlp_out"] for b in stream.batches(batch_size=128, buffer_mb=0.5)])
        excl = ActivationStore.streaming(model, str(corpus), HOOKS, tokens=4096, context=16)
        excl_norms = excl.mean_norms()
    assert {str(w): _tree(w) for w in watched} == before  # nothing written, changed or created anywhere
    for h in HOOKS:
        torch.testing.assert_close(torch.cat([b[h] for b in got]), expected[h], rtol=1e-5, atol=1e-6)
    assert row_keys(shuffled) == row_keys(expected["blocks.1.mlp_out"])  # every row once, shuffled
    # the same 4096 tokens (norm_sample_tokens=16384 covers all of them), special tokens excluded by both: the
    # same mean, up to float summation order
    assert set(excl_norms) == set(HOOKS)
    for h in HOOKS:
        assert excl_norms[h] == pytest.approx(disk_norms[h], rel=1e-6), h
