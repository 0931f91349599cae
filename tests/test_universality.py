"""`lmscope match`: decoder cosine and activation correlation, one-to-one and many-to-one, the shuffled baselines,
token alignment across tokenizers, the report, the explorer's partners and the refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from fastapi.testclient import TestClient
from typer.testing import CliRunner

import lmscope
from atlas_helpers import HOOK, make_corpus, make_tiny_atlas, tiny_dictionary
from lmscope.dictionaries import DictConfig, build
from lmscope.dictionaries.formats import save_dictionary
from lmscope.errors import LmscopeError, MatchError
from lmscope.universality import (
    MatchConfig,
    align_ends,
    char_ends,
    load_report,
    match_blocks,
    match_dictionaries,
    partners,
    side_of,
    write_report,
)
from lmscope.universality.align import ChunkAligner
from lmscope.universality.decoder import cosine_blocks
from tiny_models import save_tiny_with_tokenizer


def _dict(d_in: int, m: int, seed: int, hook: str = HOOK) -> torch.nn.Module:
    return build(DictConfig(arch="topk", d_in=d_in, d_sae=m, k=4, hook=hook, model="tiny"), seed=seed)


def _permuted_copy(d: torch.nn.Module, seed: int, noise: float = 0.02) -> tuple[torch.nn.Module, torch.Tensor]:
    """B = A's features in a random order, slightly noised: B's feature j is A's perm[j]."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(d.cfg.d_sae, generator=g)
    b = build(d.cfg, seed=seed + 1)
    with torch.no_grad():
        for name in ("W_dec", "b_enc"):
            getattr(b, name).copy_(getattr(d, name)[perm])
        b.W_enc.copy_(d.W_enc[:, perm])
        b.W_dec.add_(noise * torch.randn(b.W_dec.shape, generator=g))
        b.b_dec.copy_(d.b_dec)
    return b, perm


# ---------------------------------------------------------------------- decoder cosine
def test_hungarian_recovers_a_permutation_and_beats_the_baseline() -> None:
    a = _dict(64, 48, seed=0)
    b, perm = _permuted_copy(a, seed=3)
    r = match_dictionaries(a, b, config=MatchConfig(threshold=0.7))
    m = r["methods"]["decoder"]
    assert list(r["methods"]) == ["decoder"] and r["activation_pass"] is None
    # B's feature j is A's perm[j]: the matching gives back exactly that, both ways
    assert [p[0] for p in m["features"]["b"]["matched_ids"]] == perm.tolist()
    inv = torch.argsort(perm).tolist()
    assert [p[0] for p in m["features"]["a"]["matched_ids"]] == inv
    assert [t[0] for t in m["features"]["a"]["top_ids"]] == inv
    s, base = m["summary"], m["baseline_summary"]
    for side in ("a", "b"):
        assert s[side]["frac_matched_above"] == 1.0 and s[side]["mean_matched"] > 0.98
        assert s[side]["quantiles"]["p10"] > 0.98
        assert base[side]["frac_matched_above"] == 0.0 and base[side]["mean_max"] < 0.5
    assert "splitting" not in s


def test_many_to_one_finds_the_splits_of_a_wider_dictionary() -> None:
    narrow = _dict(64, 32, seed=0)
    g = torch.Generator().manual_seed(5)
    rows = [narrow.W_dec[i] for i in range(24)]
    for f in range(24, 32):  # each of the last 8 features is split into two whose sum is it
        u = torch.randn(64, generator=g)
        u = u - (u @ narrow.W_dec[f]) * narrow.W_dec[f]
        u = 0.5 * u / u.norm()
        rows += [narrow.W_dec[f] + u, narrow.W_dec[f] - u]
    wide = _dict(64, 40, seed=9)
    with torch.no_grad():
        wide.W_dec.copy_(torch.stack(rows))
    r = match_dictionaries(narrow, wide, config=MatchConfig(mode="many", threshold=0.7))
    m = r["methods"]["decoder"]
    split = m["summary"]["splitting"]
    assert split["narrow"] == "a" and split["split"] == 8 and split["partners_above"] == {"0": 0, "1": 24, "2": 8,
                                                                                         "3+": 0}  # fmt: skip
    assert m["baseline_summary"]["splitting"]["split"] == 0
    # every wide feature points to the narrow feature it came from; a split feature lists both of its halves
    assert [p[0] for p in m["features"]["b"]["matched_ids"]] == list(range(24)) + [f for f in range(24, 32)
                                                                                  for _ in (0, 1)]  # fmt: skip
    assert sorted(m["features"]["a"]["matched_ids"][30]) == [24 + 2 * 6, 25 + 2 * 6]
    assert m["summary"]["a"]["frac_matched_above"] == 1.0 and m["summary"]["b"]["frac_matched_above"] == 1.0
    # one-to-one leaves 8 of the wide features without a partner
    one = match_dictionaries(narrow, wide)["methods"]["decoder"]
    assert sum(not p for p in one["features"]["b"]["matched_ids"]) == 8
    assert one["summary"]["b"]["frac_matched_above"] == pytest.approx(32 / 40)


def test_a_shared_initialisation_is_named() -> None:
    a = _dict(64, 48, seed=0)
    wide = _dict(64, 96, seed=0)  # the same seed: its first 48 rows are a's initial decoder
    notes: list[str] = []
    r = match_dictionaries(a, wide, config=MatchConfig(mode="many"), log=notes.append)
    assert r["methods"]["decoder"]["summary"]["same_index"] == pytest.approx(0.5)  # 48 of the 96 wide features
    assert r["methods"]["decoder"]["baseline_summary"]["same_index"] < 0.1
    assert any("share their initialisation" in n for n in notes)
    b, _ = _permuted_copy(a, seed=3)
    notes.clear()
    assert match_dictionaries(a, b, log=notes.append)["methods"]["decoder"]["summary"]["same_index"] < 0.1
    assert not notes


def test_blocks_give_the_same_matching_as_one_block() -> None:
    a, b = _dict(16, 30, seed=1), _dict(16, 20, seed=2)
    for mode in ("hungarian", "many"):
        cfg = MatchConfig(mode=mode, top=4)  # type: ignore[arg-type]
        one = match_blocks(cosine_blocks(a.W_dec, b.W_dec, 1000), 30, 20, cfg)
        many = match_blocks(cosine_blocks(a.W_dec, b.W_dec, 7), 30, 20, cfg)
        assert np.array_equal(one.top_a, many.top_a) and np.array_equal(one.top_b, many.top_b)
        assert one.pairs_a == many.pairs_a and one.pairs_b == many.pairs_b
        full = (torch.nn.functional.normalize(a.W_dec, dim=1) @ torch.nn.functional.normalize(b.W_dec, dim=1).T)
        assert np.array_equal(one.top_b[:, 0], full.argmax(0).numpy())


def test_hungarian_refuses_a_matrix_above_its_limit() -> None:
    with pytest.raises(MatchError, match="use --mode many"):
        match_dictionaries(_dict(16, 30, 0), _dict(16, 30, 1), config=MatchConfig(hungarian_max=100))


# ---------------------------------------------------------------------- activation correlation
@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("match")
    model_dir = save_tiny_with_tokenizer("llama", str(root / "model"))
    corpus = make_corpus(root / "corpus")
    d = tiny_dictionary()
    save_dictionary(d, root / "dict")
    return root, model_dir, corpus, d


def test_activation_correlation_of_a_dictionary_with_itself_on_two_copies_of_a_model(tiny) -> None:
    _root, model_dir, corpus, d = tiny
    m1 = lmscope.load_model(model_dir, device="cpu", dtype="float32")
    m2 = lmscope.load_model(model_dir, device="cpu", dtype="float32")
    r = match_dictionaries(d, d, model=m1, other_model=m2, corpus=str(corpus), tokens=1024, context=32, by="activation")
    m = r["methods"]["activation"]
    ap = r["activation_pass"]
    assert ap["alignment"] == "same tokens" and ap["shared_tokens"] > 900 and ap["tokens"] == 1024
    silent = set(m["silent"]["a"])
    assert silent == set(m["silent"]["b"]) and len(silent) < 48
    f = m["features"]["a"]
    for i in range(48):
        if i not in silent:
            assert f["top_ids"][i][0] == i and f["top_scores"][i][0] == pytest.approx(1.0, abs=1e-4)
            assert f["matched_ids"][i] == [i]
    s, base = m["summary"]["a"], m["baseline_summary"]["a"]
    assert s["scored"] == 48 - len(silent) and s["frac_matched_above"] == 1.0
    assert base["frac_matched_above"] < 0.2 and base["mean_matched"] < 0.3
    # the report names the silent features' partners as none (the explorer says so)
    if silent:
        p = partners(r, "a", min(silent))
        assert p["methods"]["activation"]["silent"] and p["methods"]["activation"]["matched"] == []


def test_one_model_two_hooks_and_both_methods(tiny) -> None:
    _root, model_dir, corpus, d = tiny
    m = lmscope.load_model(model_dir, device="cpu", dtype="float32")
    other = _dict(32, 40, seed=4, hook="blocks.2.resid_post")
    notes: list[str] = []
    r = match_dictionaries(d, other, model=m, corpus=str(corpus), tokens=512, context=32, log=notes.append)
    assert set(r["methods"]) == {"decoder", "activation"}
    assert r["activation_pass"]["hook_a"] == HOOK and r["activation_pass"]["hook_b"] == "blocks.2.resid_post"
    assert any("decoder cosine compares directions across hooks" in n for n in notes)


def test_tokens_align_by_characters() -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    def bpe(vocab: int, texts: list[str]) -> PreTrainedTokenizerFast:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<s>"],
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                           show_progress=False))  # fmt: skip
        return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>")

    coarse = bpe(400, ["unbelievable things happen in Paris"] * 50)
    fine = bpe(260, ["a b c"])  # almost only bytes
    text = "unbelievable café ☃ Paris"
    ids_c, ends_c = char_ends(coarse, text)
    ids_f, ends_f = char_ends(fine, text)
    assert len(ids_f) > len(ids_c) and ends_c[-1] == ends_f[-1] == len(text)
    ia, ib = align_ends(ends_c, ends_f)
    # every pair ends at the same character, each character end shared by both sides pairs once (the split bytes
    # of é and ☃ by their last byte), and what one side cuts inside the other's token is dropped: the coarse side's
    # " " before "c" (the fine side reads " c" as one token)
    assert [ends_c[i] for i in ia] == [ends_f[j] for j in ib] == sorted(set(ends_c) & set(ends_f))
    assert text.index(" c") + 1 in ends_c and text.index(" c") + 1 not in [ends_c[i] for i in ia]
    snow = text.index("☃") + 1
    assert ends_f.count(snow) == 3 and ib[[ends_f[j] for j in ib].index(snow)] == max(
        j for j, e in enumerate(ends_f) if e == snow
    )  # fmt: skip
    # " unbelievable" against its pieces: only the last piece pairs
    assert align_ends([12], [2, 8, 12]) == ([0], [2])
    assert align_ends([3, -1, 7], [3, 5, 7, 7]) == ([0, 2], [0, 3])
    assert align_ends([0, 4, 2, 9], [4, 9]) == ([1, 3], [0, 1])  # an end at 0 and one going backwards are dropped


def test_slow_tokenizers_align_by_decoded_prefixes() -> None:
    class Slow:
        """A tokenizer without an offset mapping: one token per word (a space before all but the first)."""

        bos_token_id = None

        def __call__(self, text: str, add_special_tokens: bool = False, **kw: object) -> dict:
            if kw.get("return_offsets_mapping"):
                raise NotImplementedError("no offsets")
            return {"input_ids": list(range(len(text.split(" "))))}

        def decode(self, ids: list[int], clean_up_tokenization_spaces: bool = False) -> str:
            return " ".join(self.words[: len(ids)])

    slow = Slow()
    slow.words = ["a", "bb", "ccc"]  # type: ignore[attr-defined]
    assert char_ends(slow, "a bb ccc") == ([0, 1, 2], [1, 4, 8])


def test_activation_match_across_two_tokenizers(tiny, tmp_path: Path) -> None:
    _root, model_dir, corpus, d = tiny
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    other_dir = tmp_path / "other"
    tiny_model = lmscope.load_model(model_dir, device="cpu", dtype="float32")
    tiny_model.hf.save_pretrained(other_dir)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["Paris Rome France Italy def return print range"] * 10,
                            trainers.BpeTrainer(vocab_size=90, special_tokens=["<pad>", "<s>", "</s>"],
                                                show_progress=False))  # fmt: skip
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(other_dir)  # fmt: skip
    r = match_dictionaries(d, d, model=model_dir, other_model=str(other_dir), corpus=str(corpus), tokens=512,
                           context=32, by="activation", device="cpu", dtype="float32")  # fmt: skip
    ap = r["activation_pass"]
    assert ap["alignment"] == "characters" and 0 < ap["shared_tokens"] <= 512
    assert ap["unpaired_tokens"]["a"] + ap["unpaired_tokens"]["b"] > 0  # the tokenizers cut the text differently
    assert r["methods"]["activation"]["summary"]["a"]["scored"] > 0


def test_chunks_cover_the_text_in_order(tiny) -> None:
    _root, model_dir, _corpus, _d = tiny
    m = lmscope.load_model(model_dir, device="cpu", dtype="float32")
    al = ChunkAligner(m.tokenizer, m.tokenizer, 8, [0, 1, 2], [0, 1, 2])
    doc = "The capital of France is Paris. def f(x): return x + 1"
    chunks = list(al.chunks([doc]))
    assert "".join(chunks) == doc and len(chunks) > 2
    batch = next(al.batches([doc], 16))
    assert np.array_equal(batch.pos_a, batch.pos_b) and batch.dropped_a == batch.dropped_b == 0


# ---------------------------------------------------------------------- the report, the CLI and bad input
@pytest.fixture
def wide_console(monkeypatch: pytest.MonkeyPatch) -> None:
    from lmscope.cli.common import console, err_console

    for c in (console, err_console):
        monkeypatch.setattr(c, "width", 200)


def _app() -> typer.Typer:
    from lmscope.cli import atlas_cmds, match_cmd

    app = typer.Typer()
    match_cmd.register(app)
    atlas_cmds.register(app)
    return app


def test_cli_writes_the_report_and_prints_a_summary(tmp_path: Path, wide_console: None) -> None:
    a = _dict(64, 48, seed=0)
    b, _ = _permuted_copy(a, seed=3)
    save_dictionary(a, tmp_path / "a")
    save_dictionary(b, tmp_path / "b")
    out = tmp_path / "m.json"
    res = CliRunner().invoke(_app(), ["match", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "matched partner" in res.output and "baseline" in res.output and f"wrote {out}" in res.output
    rep = load_report(out)
    assert rep["a"]["path"] == str((tmp_path / "a").resolve()) and rep["command"].startswith("lmscope ")
    assert side_of(rep, rep["b"]["sha256"], None) == "b" and side_of(rep, None, str(tmp_path / "a")) == "a"
    assert side_of(rep, "nope", str(tmp_path)) is None


def test_bad_input_is_one_clear_line(tmp_path: Path, wide_console: None) -> None:
    save_dictionary(_dict(64, 16, seed=0), tmp_path / "a")
    save_dictionary(_dict(32, 16, seed=0), tmp_path / "narrow")
    runner = CliRunner()

    def err(*args: str) -> str:
        res = runner.invoke(_app(), ["match", *args, "--out", str(tmp_path / "x.json")])
        assert res.exit_code == 2, res.output
        line = " ".join(res.output.split())
        assert line.startswith("error:") and "Traceback" not in res.output
        return line

    msg = err(str(tmp_path / "a"), str(tmp_path / "narrow"))
    assert "A writes 64-dimensional decoder directions and B 32-dimensional ones" in msg and "--model" in msg
    assert "does not exist" in err(str(tmp_path / "a"), str(tmp_path / "missing"))
    assert "hungarian or many" in err(str(tmp_path / "a"), str(tmp_path / "a"), "--mode", "best")
    assert "--model" in err(str(tmp_path / "a"), str(tmp_path / "a"), "--by", "activation")
    assert not (tmp_path / "x.json").exists()
    (tmp_path / "bad.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(MatchError, match="not an lmscope match report"):
        load_report(tmp_path / "bad.json")
    with pytest.raises(MatchError, match="no match report"):
        load_report(tmp_path / "none.json")
    with pytest.raises(MatchError, match="threshold"):
        MatchConfig(threshold=2.0)


def test_activation_inputs_are_checked_before_any_work(tiny) -> None:
    _root, model_dir, corpus, d = tiny
    nohook = build(DictConfig(arch="topk", d_in=32, d_sae=8, k=2), seed=0)
    with pytest.raises(MatchError, match=r"B names no hook \(cfg.hook\); pass --other-hook"):
        match_dictionaries(d, nohook, model=model_dir, corpus=str(corpus), tokens=64, context=32, by="activation")
    wide = _dict(64, 8, seed=0)  # reads 64 dimensions at a hook that is 32 wide
    with pytest.raises(MatchError, match=r"blocks\.1\.resid_post of .* is 32 wide but its dictionary reads d_in=64"):
        match_dictionaries(d, wide, model=model_dir, corpus=str(corpus), tokens=64, context=32, by="activation")
    with pytest.raises(LmscopeError, match="out of range"):
        match_dictionaries(d, d, model=model_dir, other_hook="blocks.9.resid_post", corpus=str(corpus), tokens=64)


# ---------------------------------------------------------------------- the explorer
@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("match-web")
    _model, d, _corpus, atlas = make_tiny_atlas(root)
    b, perm = _permuted_copy(d, seed=7)
    save_dictionary(b, root / "other")
    report = match_dictionaries(root / "dict", root / "other")
    write_report(report, root / "match.json")
    rev = match_dictionaries(root / "other", root / "dict")
    write_report(rev, root / "rev.json")
    return root, atlas, perm


def test_the_explorer_lists_a_features_partners(served) -> None:
    from lmscope.web.app import create_app

    root, atlas, perm = served
    inv = torch.argsort(perm).tolist()
    c = TestClient(create_app(atlas, match=root / "match.json", partner_url="http://127.0.0.1:8001"))
    p = c.get("/api/features/5/partners").json()
    dec = p["methods"]["decoder"]
    assert p["side"] == "a" and dec["matched"][0]["id"] == inv[5] and dec["matched"][0]["above"]
    assert dec["matched"][0]["url"] == f"http://127.0.0.1:8001/features/{inv[5]}"
    page = c.get("/features/5").text
    assert 'id="partners"' in page and f'href="http://127.0.0.1:8001/features/{inv[5]}"' in page
    assert c.get("/api/match").json()["side"] == "a"
    assert c.get("/api/features/999/partners").status_code == 404
    # the atlas's dictionary as side B of another report; no partner URL: ids without links, and how to get them
    c2 = TestClient(create_app(atlas, match=root / "rev.json"))
    p2 = c2.get("/api/features/5/partners").json()
    assert p2["side"] == "b" and p2["methods"]["decoder"]["matched"][0]["id"] == inv[5]
    assert "--partner-url" in c2.get("/features/5").text
    # without a report: no partners section, and the API says how to load one
    c3 = TestClient(create_app(atlas))
    assert 'id="partners"' not in c3.get("/features/5").text
    assert "--match" in c3.get("/api/features/5/partners").json()["detail"]


def test_the_explorer_refuses_a_report_without_its_dictionary(served, tmp_path: Path) -> None:
    from lmscope.web.app import create_app

    _root, atlas, _ = served
    save_dictionary(_dict(32, 8, seed=1), tmp_path / "x")
    save_dictionary(_dict(32, 8, seed=2), tmp_path / "y")
    write_report(match_dictionaries(tmp_path / "x", tmp_path / "y"), tmp_path / "xy.json")
    with pytest.raises(LmscopeError, match="neither is this atlas's dictionary"):
        create_app(atlas, match=tmp_path / "xy.json")
    with pytest.raises(LmscopeError, match="no match report"):
        create_app(atlas, match=tmp_path / "none.json")
