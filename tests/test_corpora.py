"""Corpus readers, the stdlib corpus, and tokenisation into fixed-length contexts."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from harvest_helpers import make_corpus_dir, make_tiny_model_dir
from lmscope.corpora import (
    ContextPacker,
    CorpusError,
    HFDatasetCorpus,
    JsonlCorpus,
    PackingConfig,
    ParquetCorpus,
    StdlibCorpus,
    TextCorpus,
    decode_bytes,
    open_corpus,
)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    from transformers import AutoTokenizer

    d = make_tiny_model_dir(tmp_path_factory.mktemp("tiny"))
    return AutoTokenizer.from_pretrained(str(d))


def test_decode_bytes_replaces_and_counts() -> None:
    assert decode_bytes("héllo".encode()) == ("héllo", 0)
    text, bad = decode_bytes(b"ok \xff\xfe then \x80 end")
    assert bad == 3
    assert text == "ok \ufffd\ufffd then \ufffd end"


def test_text_corpus_dir_glob_binary_and_undecodable(tmp_path: Path) -> None:
    (tmp_path / "b.txt").write_text("second")
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.md").write_bytes(b"bad \xff byte")
    (tmp_path / "blob.bin").write_bytes(b"\0\1\2binary")
    (tmp_path / ".hidden").write_text("never read")
    (tmp_path / "empty.txt").write_text("")
    corpus = TextCorpus(tmp_path)
    docs = list(corpus.documents())
    assert docs == ["first", "second", "bad \ufffd byte"]
    assert corpus.stats.replaced_bytes == 1 and corpus.stats.files_with_replacements == 1
    assert corpus.stats.skipped_binary_files == 1 and corpus.stats.empty_documents == 1
    assert list(TextCorpus(str(tmp_path / "**" / "*.md")).documents()) == ["bad \ufffd byte"]
    fp = corpus.fingerprint()
    assert fp == TextCorpus(tmp_path).fingerprint()
    (tmp_path / "a.txt").write_text("first, edited")
    assert TextCorpus(tmp_path).fingerprint() != fp


def test_jsonl_field_and_errors(tmp_path: Path) -> None:
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in [{"text": "one", "x": 1}, {"text": "two"}, {"text": None}]) + "\n\n")
    corpus = open_corpus(str(p))
    assert isinstance(corpus, JsonlCorpus)
    assert list(corpus.documents()) == ["one", "two"]
    with pytest.raises(CorpusError, match=r"no field .body.*--field"):
        list(JsonlCorpus(p, field="body").documents())
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(CorpusError, match=r"bad.jsonl:2 is not valid JSON"):
        list(JsonlCorpus(bad).documents())


def test_parquet_column(tmp_path: Path) -> None:
    p = tmp_path / "d.parquet"
    pq.write_table(pa.table({"body": ["alpha", None, "beta", "gamma"], "n": [1, 2, 3, 4]}), p, row_group_size=2)
    corpus = open_corpus(str(p), field="body")
    assert isinstance(corpus, ParquetCorpus)
    assert list(corpus.documents()) == ["alpha", "beta", "gamma"]
    assert corpus.stats.empty_documents == 1
    with pytest.raises(CorpusError, match="no column 'text'"):
        list(ParquetCorpus(p).documents())


def test_hf_datasets_optional(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(CorpusError, match="pip install datasets"):
        open_corpus("hf:wikitext")
    fake = types.ModuleType("datasets")
    calls = {}

    def load_dataset(name, config, split, streaming):
        calls.update(name=name, config=config, split=split, streaming=streaming)
        return [{"content": "hello"}, {"content": ""}, {"content": "world"}]

    fake.load_dataset = load_dataset  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "datasets", fake)
    corpus = open_corpus("hf:some/data:cfg", field="content", split="validation")
    assert isinstance(corpus, HFDatasetCorpus)
    assert list(corpus.documents()) == ["hello", "world"]
    assert calls == {"name": "some/data", "config": "cfg", "split": "validation", "streaming": True}


def test_open_corpus_errors(tmp_path: Path) -> None:
    with pytest.raises(CorpusError, match="corpus not found"):
        open_corpus(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorpusError, match="empty corpus"):
        open_corpus(str(tmp_path / "empty"))
    with pytest.raises(CorpusError, match="matches no files"):
        open_corpus(str(tmp_path / "*.zzz"))


def test_stdlib_corpus_is_deterministic_and_licensed() -> None:
    a, b = StdlibCorpus(), StdlibCorpus()
    assert a.fingerprint() == b.fingerprint()
    assert "PSF" in a.describe()["license"]
    names = [p.relative_to(a.root).as_posix() for p in a.files]
    assert names == sorted(names)
    assert not any("/test/" in f"/{n}" or "site-packages" in n for n in names)
    docs = a.documents()
    first = [next(docs) for _ in range(6)]
    again = b.documents()
    assert first == [next(again) for _ in range(6)]
    from pydoc_data.topics import topics

    assert first[0] == sorted(topics.items())[0][1]  # English reference text, interleaved with source
    assert first[1] == a.files[0].read_text(encoding="utf-8")


def test_packing_reconstructs_documents(tokenizer, tmp_path: Path) -> None:
    corpus = TextCorpus(make_corpus_dir(tmp_path, n_docs=5, words=60))
    docs = list(corpus.documents())
    packer = ContextPacker(tokenizer, PackingConfig(context=16))
    batches = list(packer.contexts(docs, batch_size=7))
    tok = np.concatenate([b.tokens for b in batches])
    doc = np.concatenate([b.document for b in batches])
    pos = np.concatenate([b.position for b in batches])
    special = np.concatenate([b.special for b in batches])
    assert tok.shape[1] == 16 and all(len(b) <= 7 for b in batches)
    assert (tok[:, 0] == tokenizer.bos_token_id).all() and (pos[:, 0] == -1).all() and special[:, 0].all()
    body_t, body_d, body_p = tok[:, 1:].ravel(), doc[:, 1:].ravel(), pos[:, 1:].ravel()
    seps = body_p == -1
    assert (body_t[seps] == tokenizer.eos_token_id).all()
    encoded = tokenizer(docs, add_special_tokens=False)["input_ids"]
    for d in range(len(docs) - 1):  # every complete document reappears in order, position by position
        mine = (body_d == d) & ~seps
        assert body_t[mine].tolist() == encoded[d]
        assert body_p[mine].tolist() == list(range(len(encoded[d])))
    assert not special[:, 1:][~(pos[:, 1:] == -1)].any()


def test_truncate_and_bos_modes(tokenizer) -> None:
    docs = ["the model layer", "python def return " * 20]
    packer = ContextPacker(tokenizer, PackingConfig(context=12, mode="truncate"))
    b = next(packer.contexts(docs, batch_size=8))
    assert len(b) == 2
    assert b.tokens[0, 0] == tokenizer.bos_token_id
    n0 = len(tokenizer(docs[0], add_special_tokens=False)["input_ids"])
    assert (b.tokens[0, 1 + n0 :] == tokenizer.pad_token_id).all() and b.special[0, 1 + n0 :].all()
    assert not b.special[1, 1:].any()
    doc_bos = ContextPacker(tokenizer, PackingConfig(context=8, bos="document", separator=-1))
    rows = np.concatenate([x.tokens for x in doc_bos.contexts(docs, 4)]).ravel()
    assert rows[0] == tokenizer.bos_token_id and (rows == tokenizer.bos_token_id).sum() >= 1
    assert tokenizer.eos_token_id not in rows
    none = ContextPacker(tokenizer, PackingConfig(context=8, bos="none"))
    assert tokenizer.bos_token_id not in np.concatenate([x.tokens for x in none.contexts(docs, 4)])
    with pytest.raises(CorpusError, match="at least 2"):
        PackingConfig(context=1)


def test_packing_config_to_dict_from_dict() -> None:
    p = PackingConfig(context=16, mode="truncate", bos="document", separator=2, tokenize_batch=3, tokenize_chars=99)
    assert PackingConfig.from_dict(p.to_dict(batching=True)) == p
    assert p.to_dict() == {"context": 16, "mode": "truncate", "bos": "document", "separator": 2}  # token ids only
    assert PackingConfig.from_dict(p.to_dict()) == PackingConfig(
        context=16, mode="truncate", bos="document", separator=2
    )
    assert PackingConfig.from_dict({}) == PackingConfig()
    with pytest.raises(CorpusError, match=r"unknown packing setting\(s\) 'sepparator'.*known: context, mode"):
        PackingConfig.from_dict({"sepparator": 2})
    with pytest.raises(CorpusError, match=r"packing mode must be 'pack' or 'truncate'"):
        PackingConfig.from_dict({"mode": "squash"})
