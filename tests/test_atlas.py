"""Atlas build: statistics and examples recomputed from scratch, sampling, logit effects, schema, resume."""

from __future__ import annotations

import copy
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import lmscope
from atlas_helpers import CFG, HOOK, make_corpus, make_tiny_atlas
from lmscope.atlas import AtlasConfig, AtlasError, add_label, build_atlas, open_atlas
from lmscope.atlas.accumulate import FeatureAccumulator
from lmscope.atlas.logits import direct_effects, logit_lens
from lmscope.atlas.schema import SCHEMA_VERSION, create, get_meta, set_meta
from lmscope.corpora import ContextPacker, PackingConfig, TextCorpus
from lmscope.dictionaries import DictConfig, build
from lmscope.dictionaries.formats import save_dictionary
from tiny_models import save_tiny_with_tokenizer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("atlas")
    model, d, corpus, out = make_tiny_atlas(root)
    return model, d, corpus, out, root


def all_latents(model, d, corpus: Path, cfg: AtlasConfig) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
    """Tokens, special mask and latents of every context of the build, computed one context at a time."""
    packer = ContextPacker(model.tokenizer, PackingConfig(context=cfg.context))
    stream = packer.rows(TextCorpus(corpus).documents())
    rows = [r for _, r in zip(range(cfg.tokens // cfg.context), stream, strict=False)]
    batch = packer.stack(rows)
    zs = []
    with model.capture([HOOK]) as acts, torch.no_grad():
        for i in range(len(batch)):
            model(torch.from_numpy(batch.tokens[i : i + 1]))
            zs.append(d.encode(acts[HOOK].float())[0])
    return batch.tokens, batch.special, torch.stack(zs)


def test_statistics_and_examples_match_recomputation(tiny) -> None:
    model, d, corpus, out, _ = tiny
    tokens, special, z = all_latents(model, d, corpus, CFG)
    zm = z.masked_fill(torch.from_numpy(special).unsqueeze(-1), 0)
    conn = open_atlas(out)
    n_valid = int((~special).sum())
    feats = {r["id"]: r for r in conn.execute("SELECT * FROM features")}
    assert len(feats) == 48
    for f, row in feats.items():
        col = zm[..., f]
        fired = col > 0
        assert row["n_fired"] == int(fired.sum())
        assert row["density"] == pytest.approx(int(fired.sum()) / n_valid)
        assert row["max_act"] == pytest.approx(float(col.max()), rel=1e-4, abs=1e-6)
        if fired.any():
            assert row["mean_act"] == pytest.approx(float(col[fired].mean()), rel=1e-4)
            hist = json.loads(row["hist"])
            assert sum(hist["counts"]) == int(fired.sum())
            assert hist["width"] * len(hist["counts"]) >= row["max_act"]
        # top examples: the contexts with the largest maxima, each window equal to a fresh recomputation
        per_ctx = col.max(dim=1).values
        want = per_ctx[per_ctx > 0].sort(descending=True).values[: CFG.top_k]
        got = conn.execute(
            "SELECT * FROM examples WHERE feature = ? AND kind = 'top' ORDER BY rank", (f,)
        ).fetchall()
        assert [e["act"] for e in got] == pytest.approx(want.tolist(), rel=1e-4, abs=1e-6)
        for e in got:
            acts = np.frombuffer(e["acts"], dtype="<f4")
            ctx_tokens = np.frombuffer(
                conn.execute("SELECT tokens FROM contexts WHERE id = ?", (e["context"],)).fetchone()[0], dtype="<i4"
            )
            assert (ctx_tokens == tokens[e["context"]]).all()
            np.testing.assert_allclose(acts, z[e["context"], e["start"] : e["start"] + len(acts), f].numpy(), atol=1e-5)
            assert e["peak_token"] == tokens[e["context"], e["pos"]]
            assert not special[e["context"], e["pos"]]


def test_quantile_samples_lie_in_their_bins(tiny) -> None:
    model, d, corpus, out, _ = tiny
    _tokens, special, z = all_latents(model, d, corpus, CFG)
    zm = z.masked_fill(torch.from_numpy(special).unsqueeze(-1), 0)
    conn = open_atlas(out)
    checked = 0
    for b in conn.execute("SELECT * FROM quantile_bins"):
        col = zm[..., b["feature"]]
        top = float(col.max())
        in_bin = (col >= b["lo"]) & ((col < b["hi"]) | ((col == top) & (b["hi"] == pytest.approx(top)))) & (col > 0)
        assert b["count"] == int(in_bin.sum())
        ex = conn.execute(
            "SELECT * FROM examples WHERE feature = ? AND kind = 'quantile' AND bin = ?", (b["feature"], b["bin"])
        ).fetchall()
        assert len(ex) == min(CFG.samples_per_bin, b["count"])
        for e in ex:
            assert b["lo"] <= e["act"] <= b["hi"]
            assert e["act"] == pytest.approx(float(zm[e["context"], e["pos"], b["feature"]]), rel=1e-5)
            checked += 1
    assert checked > 20


def test_bottom_s_sampling_is_uniform_and_survives_rescaling() -> None:
    """Activations grow over the stream (forcing bin merges); bin counts are exact and samples uniform."""
    hits = torch.zeros(64)
    for seed in range(150):
        acc = FeatureAccumulator(1, top_k=2, bins=4, samples=2, hist_bins=8, before=1, after=1, seed=seed)
        # 64 tokens in 4 contexts of 16: values 1..64 arrive in increasing order, so S doubles repeatedly
        vals = torch.arange(1, 65, dtype=torch.float32).reshape(4, 16, 1)
        for c in range(4):
            acc.update(vals[c : c + 1], torch.zeros(1, 16, dtype=torch.bool), torch.tensor([c]))
        # S: 32 after the first context (max 16), 64 after the second (max 32), 128 after the last (max 64)
        assert float(acc.scale[0]) == 128.0 and float(acc.max_act[0]) == 64.0
        assert acc.q_count[0].tolist() == [31, 32, 1, 0]  # [0, 32) holds 1..31, [32, 64) 32..63, [64, 96) 64
        assert acc.hist[0].tolist() == [15, 16, 16, 16, 1, 0, 0, 0]
        assert acc.bin_ranges()[1].tolist() == [3] and acc.hist_ranges()[1].tolist() == [5]
        picked = acc.q.act[0, 0]
        assert ((picked >= 1) & (picked < 32)).all()
        hits[acc.q.act[0, :2].reshape(-1).long() - 1] += 1
    # each value of a bin is picked with probability 2/size: 300/31 ~ 9.7 and 300/32 ~ 9.4 times on average
    assert hits[:31].sum() == 300 and hits[31:63].sum() == 300
    assert hits[:63].min() >= 1 and hits[:63].max() <= 25


def test_logit_effects_match_direct_computation(tiny) -> None:
    model, d, _, out, _ = tiny
    conn = open_atlas(out)
    hf = model.hf
    w_norm = hf.model.norm.weight.detach()
    W_U = hf.lm_head.weight.detach()
    for f in (0, 7, 31):
        direct = (d.W_dec[f].detach() * w_norm) @ W_U.T
        stored = json.loads(conn.execute("SELECT logits FROM features WHERE id = ?", (f,)).fetchone()[0])
        top = direct.topk(CFG.logit_top)
        assert [i for i, _ in stored["positive"]] == top.indices.tolist()
        assert [v for _, v in stored["positive"]] == pytest.approx(top.values.tolist(), rel=1e-4, abs=1e-6)
        bottom = direct.topk(CFG.logit_top, largest=False)
        assert [i for i, _ in stored["negative"]] == bottom.indices.tolist()


def test_logit_lens_linearises_the_final_norm(tiny) -> None:
    """With the RMS held fixed, adding a direction to the final norm's input moves the logits by its effect."""
    model, d, *_ = tiny
    lens = logit_lens(model)
    assert lens is not None
    hf = model.hf
    x = torch.randn(32)
    direction = d.W_dec[3].detach()
    norm = hf.model.norm
    rms = x.pow(2).mean().add(norm.variance_epsilon).rsqrt()
    with torch.no_grad():
        base = hf.lm_head(norm.weight * (x * rms))
        moved = hf.lm_head(norm.weight * ((x + direction) * rms))
    torch.testing.assert_close(moved - base, direct_effects(lens, direction[None])[0] * rms, rtol=1e-4, atol=1e-5)


# family -> (final norm, unembedding), module paths written by hand from the HF modelling source
FINAL_NORM_AND_HEAD = {
    "gemma": ("model.norm", "lm_head"),  # RMSNorm with gain 1 + weight
    "gemma2": ("model.norm", "lm_head"),  # the same, and logits soft-capped at 30
    "gemma3": ("model.norm", "lm_head"),
    "gpt2": ("transformer.ln_f", "lm_head"),  # LayerNorm
    "gpt_neox": ("gpt_neox.final_layer_norm", "lm_head"),  # LayerNorm (`embed_out` before transformers 5)
}


@pytest.mark.parametrize("family", sorted(FINAL_NORM_AND_HEAD))
def test_logit_effects_through_gemma_and_layernorm_final_norms(family: str, tmp_path: Path) -> None:
    """The atlas's logit effects equal the decoder row pushed by hand through the model's own final norm (its
    1/RMS or 1/std, which depends on the row, divided back out) and unembedding; the norm's weights are
    randomised first, so a gain of w instead of 1 + w, or a LayerNorm not centred, would show."""
    model = lmscope.load_model(save_tiny_with_tokenizer(family, str(tmp_path / "model")), device="cpu")
    hf = model.hf
    norm_path, head_path = FINAL_NORM_AND_HEAD[family]
    norm, head = hf.get_submodule(norm_path), hf.get_submodule(head_path)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        centre = 0.0 if family.startswith("gemma") else 1.0  # Gemma stores the gain minus 1
        norm.weight.copy_(torch.randn(norm.weight.shape, generator=g) * 0.5 + centre)
        if getattr(norm, "bias", None) is not None:
            norm.bias.copy_(torch.randn(norm.bias.shape, generator=g))
    d = build(DictConfig(arch="topk", d_in=32, d_sae=16, k=4, hook="blocks.1.resid_post"), seed=0)
    cfg = AtlasConfig(tokens=256, context=32, batch_size=4, top_k=2, bins=4, samples_per_bin=1, hist_bins=8)
    out = build_atlas(model, d, str(make_corpus(tmp_path / "corpus")), out=tmp_path / "a.db", config=cfg,
                      progress=False)  # fmt: skip
    conn = open_atlas(out)
    softcap = getattr(hf.config, "final_logit_softcapping", None)
    assert (softcap is not None) == (family == "gemma2")
    W_dec = d.W_dec.detach()
    with torch.no_grad():
        if isinstance(norm, torch.nn.LayerNorm):
            scale = (W_dec.var(-1, unbiased=False, keepdim=True) + norm.eps).sqrt()
            through_norm = (norm(W_dec) - norm.bias) * scale  # = (d - mean d) * weight
        else:
            eps = getattr(norm, "eps", getattr(norm, "variance_epsilon", None))
            scale = (W_dec.pow(2).mean(-1, keepdim=True) + eps).sqrt()
            through_norm = norm(W_dec) * scale  # = d * (1 + weight) for Gemma
        by_hand = head(through_norm)  # [d_sae, vocab], before any soft-cap
    # a lens that skipped the centring (LayerNorm) or used w instead of 1 + w (Gemma) would differ
    assert not torch.allclose(through_norm, W_dec * norm.weight, atol=1e-3)
    for f in range(16):
        stored = json.loads(conn.execute("SELECT logits FROM features WHERE id = ?", (f,)).fetchone()[0])
        top, bottom = by_hand[f].topk(cfg.logit_top), by_hand[f].topk(cfg.logit_top, largest=False)
        assert [i for i, _ in stored["positive"]] == top.indices.tolist(), f
        assert [v for _, v in stored["positive"]] == pytest.approx(top.values.tolist(), rel=1e-4, abs=1e-6)
        assert [i for i, _ in stored["negative"]] == bottom.indices.tolist(), f
        assert [v for _, v in stored["negative"]] == pytest.approx(bottom.values.tolist(), rel=1e-4, abs=1e-6)
        if softcap is not None:  # the cap is monotonic: the capped logits rank the tokens the same way
            capped = torch.tanh(by_hand[f] / softcap) * softcap
            assert capped.topk(cfg.logit_top).indices.tolist() == top.indices.tolist()


def test_neighbours_and_cofire(tiny) -> None:
    model, d, corpus, out, _ = tiny
    conn = open_atlas(out)
    w = torch.nn.functional.normalize(d.W_dec.detach(), dim=1)
    sim = w @ w.T
    sim.fill_diagonal_(-2)
    for f in (0, 5):
        neigh = json.loads(conn.execute("SELECT neighbours FROM features WHERE id = ?", (f,)).fetchone()[0])
        assert [n for n, _ in neigh] == sim[f].topk(CFG.neighbours).indices.tolist()
    # every token is in the co-firing sample here (2048 tokens < cofire_tokens), so counts are exact
    _tokens, special, z = all_latents(model, d, corpus, CFG)
    active = (z > 0) & ~torch.from_numpy(special).unsqueeze(-1)
    a = active.reshape(-1, 48).float()
    co = a.T @ a
    for f in (1, 2):
        stored = json.loads(conn.execute("SELECT cofire FROM features WHERE id = ?", (f,)).fetchone()[0])
        for g, count, frac in stored:
            assert count == co[f, g]
            assert frac == pytest.approx(float(co[f, g] / co[f, f]), rel=1e-4)
        if stored:
            others = co[f].clone()
            others[f] = -1
            assert stored[0][1] == others.max()


def test_build_metrics_equal_a_recomputation(tiny) -> None:
    """The atlas's L0 and FVU are the dictionary's on the build's non-special tokens, recomputed here from the
    activations one context at a time (dense encode and decode, not the build's sparse path)."""
    model, d, corpus, out, _ = tiny
    packer = ContextPacker(model.tokenizer, PackingConfig(context=CFG.context))
    rows = [r for _, r in zip(range(CFG.tokens // CFG.context), packer.rows(TextCorpus(corpus).documents()),
                              strict=False)]  # fmt: skip
    batch = packer.stack(rows)
    xs = []
    with model.capture([HOOK]) as acts, torch.no_grad():
        for i in range(len(batch)):
            model(torch.from_numpy(batch.tokens[i : i + 1]))
            xs.append(acts[HOOK][0].double())
    keep = ~torch.from_numpy(batch.special)
    x = torch.stack(xs)[keep]  # [non-special tokens, d_model]
    dd = copy.deepcopy(d).double()
    with torch.no_grad():
        z = dd.encode(x)
        recon = dd.decode(z)
    l0 = float((z > 0).sum(-1).double().mean())
    fvu = float((x - recon).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    assert int((~keep).sum()) > 0 and len(x) == int(keep.sum())  # the build has special tokens to leave out
    metrics = get_meta(open_atlas(out), "metrics")["atlas"]
    assert metrics["tokens"] == len(x) and metrics["contexts"] == len(batch)
    assert metrics["l0"] == pytest.approx(l0, rel=1e-9)
    assert metrics["fvu"] == pytest.approx(fvu, rel=1e-4)
    assert metrics["dead"] == int(((z > 0).sum(0) == 0).sum())


def test_metadata_labels_and_fts(tiny) -> None:
    *_, out, root = tiny
    conn = open_atlas(out)
    meta = {r["key"]: json.loads(r["value"]) for r in conn.execute("SELECT key, value FROM meta")}
    assert meta["complete"] == 1 and meta["schema_version"] == SCHEMA_VERSION
    assert meta["provenance"]["hook"] == HOOK and meta["provenance"]["dictionary"]["config"]["d_sae"] == 48
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    hits = conn.execute("SELECT DISTINCT feature FROM search WHERE search MATCH ? AND kind = 'example'", ('"Paris"',))
    assert hits.fetchall()
    with pytest.raises(sqlite3.OperationalError):
        conn.execute("DELETE FROM features")  # read-only
    # labels (issue 6) go to the search index through a trigger
    rw = sqlite3.connect(root / "labelled.db")
    conn.backup(rw)
    add_label(rw, 3, "zebra crossings", source="machine", explainer="test", score=0.5, scorer="sim")
    rw.commit()
    assert rw.execute("SELECT feature FROM search WHERE search MATCH 'zebra'").fetchall() == [(3,)]
    with pytest.raises(AtlasError, match="human"):
        add_label(rw, 3, "x", source="robot")


def test_newer_schema_and_unfinished_builds_are_refused(tmp_path: Path) -> None:
    conn = create(tmp_path / "a.db")
    conn.close()
    with pytest.raises(AtlasError, match="unfinished"):
        open_atlas(tmp_path / "a.db")
    conn = sqlite3.connect(tmp_path / "a.db")
    set_meta(conn, "complete", 1)
    set_meta(conn, "schema_version", SCHEMA_VERSION + 1)
    conn.commit()
    conn.close()
    with pytest.raises(AtlasError, match=f"schema version {SCHEMA_VERSION + 1}.*upgrade"):
        open_atlas(tmp_path / "a.db")
    (tmp_path / "junk.db").write_bytes(b"not sqlite at all" * 100)
    with pytest.raises(AtlasError, match="not an lmscope atlas"):
        open_atlas(tmp_path / "junk.db")
    with pytest.raises(AtlasError, match="does not exist"):
        open_atlas(tmp_path / "missing.db")


def test_existing_atlas_is_kept_and_an_interrupted_build_leaves_only_a_partial(tiny, tmp_path: Path) -> None:
    model, d, corpus, _out, _ = tiny
    small = AtlasConfig(tokens=256, context=32, batch_size=4, top_k=2, bins=4, samples_per_bin=1, hist_bins=8)
    target = build_atlas(model, d, str(corpus), out=tmp_path / "x.db", config=small, progress=False)
    open_atlas(target).close()
    before = target.read_bytes()
    with pytest.raises(AtlasError, match="already exists"):
        build_atlas(model, d, str(corpus), out=target, config=small, progress=False)
    assert target.read_bytes() == before

    # an exception at the end of the pass ("writing examples" is logged there) leaves no file at `out` and an
    # unfinished .partial
    class Boom(Exception):
        pass

    def boom(msg: str) -> None:
        raise Boom(msg)

    other = tmp_path / "y.db"
    with pytest.raises(Boom, match="writing examples"):
        build_atlas(model, d, str(corpus), out=other, config=small, progress=False, log=boom)
    assert not other.exists()
    partial = tmp_path / "y.db.partial"
    assert partial.is_file()
    with pytest.raises(AtlasError, match="unfinished"):
        open_atlas(partial)


def _has_schema(path: Path) -> bool:
    """Whether `path` is an atlas database whose schema is committed (read without disturbing its writer)."""
    if not path.exists():
        return False
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=0.1)
        try:
            return conn.execute("SELECT value FROM meta WHERE key = 'format'").fetchone() is not None
        finally:
            conn.close()
    except sqlite3.Error:
        return False


def _table(conn: sqlite3.Connection, name: str) -> list[tuple]:
    return [tuple(r) for r in conn.execute(f"SELECT * FROM {name} ORDER BY 1, 2")]


def test_kill_9_mid_pass_then_rerun_equals_an_uninterrupted_build(tiny, tmp_path: Path) -> None:
    """`lmscope atlas` SIGKILLed in the middle of its pass leaves no atlas and a refused .partial; the same
    command run again removes it, starts over and writes what an uninterrupted build writes."""
    *_, root = tiny
    corpus = make_corpus(tmp_path / "corpus", n_docs=400)  # ~25k tokens: the pass takes a second or more
    out = tmp_path / "killed.db"
    partial = tmp_path / "killed.db.partial"
    args = [sys.executable, "-m", "lmscope.cli.app", "atlas", str(root / "model"), "--dict", str(root / "dict"),
            "--corpus", str(corpus), "--tokens", "20k", "--context", "32", "--out", str(out), "--device", "cpu",
            "--no-progress"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not _has_schema(partial):
        time.sleep(0.005)
    # the .partial has its schema: the pass has started (it begins right after), and it takes a second or more
    assert proc.poll() is None, f"the build ended before it could be killed: {proc.communicate()}"
    os.kill(proc.pid, signal.SIGKILL)
    _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert "writing examples" not in err  # killed before the pass ended (this is logged right after it)
    assert not out.exists()
    assert partial.is_file()
    with pytest.raises(AtlasError, match="unfinished"):
        open_atlas(partial)
    rerun = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert "removing the unfinished build" in rerun.stderr
    assert not partial.exists() and not list(tmp_path.glob("killed.db.partial*"))
    # the reference: the same build, uninterrupted, in this process (one thread, as in the subprocess)
    ref_cfg = AtlasConfig(tokens=20_000, context=32, batch_size=8, top_k=16, samples_per_bin=4)  # the CLI's
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = lmscope.load_model(str(root / "model"), device="cpu")
        ref = build_atlas(model, root / "dict", str(corpus), out=tmp_path / "ref.db", config=ref_cfg, progress=False)
    finally:
        torch.set_num_threads(threads)
    a, b = open_atlas(out), open_atlas(ref)
    assert get_meta(a, "complete") == 1
    assert a.execute("SELECT count(*) FROM features").fetchone()[0] == 48
    for table in ("features", "examples", "quantile_bins", "contexts"):
        assert _table(a, table) == _table(b, table), table
    assert get_meta(a, "metrics") == get_meta(b, "metrics")


def test_cli_atlas_writes_an_atlas(tiny, tmp_path: Path) -> None:
    from lmscope.cli.app import app

    _model, d, corpus, _, root = tiny
    ddir = save_dictionary(d, tmp_path / "dict")
    out = tmp_path / "cli.db"
    res = CliRunner().invoke(
        app,
        ["atlas", str(root / "model"), "--dict", str(ddir), "--corpus", str(corpus), "--tokens", "512",
         "--context", "32", "--out", str(out), "--no-progress", "--device", "cpu"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "48 features" in res.output
    conn = open_atlas(out)
    assert conn.execute("SELECT count(*) FROM features").fetchone()[0] == 48
    res = CliRunner().invoke(app, ["atlas", str(root / "model"), "--dict", str(ddir), "--out", str(out)])
    assert res.exit_code == 2 and "already exists" in res.output


@pytest.mark.smollm2
def test_smollm2_atlas_top_examples_recompute(smollm2, tmp_path: Path) -> None:
    hook = "blocks.6.resid_post"
    d = build(DictConfig(arch="topk", d_in=576, d_sae=256, k=16, hook=hook, model="smollm2-135m"), seed=0)
    cfg = AtlasConfig(tokens=2048, context=64, batch_size=8, top_k=8, bins=16, samples_per_bin=2)
    out = build_atlas(smollm2, d, "stdlib", out=tmp_path / "s.db", config=cfg, progress=False)
    conn = open_atlas(out)
    feats = [r[0] for r in conn.execute("SELECT id FROM features WHERE dead = 0 ORDER BY id LIMIT 3")]
    assert feats
    with smollm2.capture([hook]) as acts, torch.no_grad():
        for f in feats:
            for e in conn.execute("SELECT * FROM examples WHERE feature = ? ORDER BY kind, rank LIMIT 6", (f,)):
                ctx = np.frombuffer(
                    conn.execute("SELECT tokens FROM contexts WHERE id = ?", (e["context"],)).fetchone()[0], "<i4"
                )
                smollm2(torch.from_numpy(ctx.astype(np.int64))[None])
                z = d.encode(acts[hook].float())[0, :, f]
                stored = np.frombuffer(e["acts"], dtype="<f4")
                np.testing.assert_allclose(stored, z[e["start"] : e["start"] + len(stored)].numpy(), atol=2e-3)
                assert e["act"] == pytest.approx(float(z[e["pos"]]), abs=2e-3)
    W_U = smollm2.hf.lm_head.weight.detach().float()
    w = smollm2.hf.model.norm.weight.detach().float()
    direct = (d.W_dec[feats[0]].detach() * w) @ W_U.T
    stored = json.loads(conn.execute("SELECT logits FROM features WHERE id = ?", (feats[0],)).fetchone()[0])
    assert [i for i, _ in stored["positive"]] == direct.topk(cfg.logit_top).indices.tolist()
    assert stored["positive"][0][1] == pytest.approx(float(direct.max()), rel=1e-4)
