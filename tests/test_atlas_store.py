"""An atlas built from a harvested store (no forward pass) equals one built by running the model, when the store
holds the same activations (float32, same batches); a store that does not match the build is refused with the
reason."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

import lmscope
from atlas_helpers import CFG, HOOK, make_corpus, table_rows, tiny_dictionary
from lmscope.activations import HarvestConfig, harvest
from lmscope.atlas import AtlasError, build_atlas
from lmscope.dictionaries.formats import save_dictionary
from tiny_models import save_tiny_with_tokenizer

TABLES = (
    "SELECT id, tokens FROM contexts ORDER BY id",
    "SELECT context, start, source FROM context_sources ORDER BY context, start",
    "SELECT feature, kind, bin, rank, context, pos, act, start, acts, peak_token, text FROM examples "
    "ORDER BY feature, kind, bin, rank",
    "SELECT * FROM quantile_bins ORDER BY feature, bin",
    "SELECT * FROM features ORDER BY id",
    "SELECT value FROM meta WHERE key = 'metrics'",
)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("store")
    model = lmscope.load_model(save_tiny_with_tokenizer("llama", str(root / "model")), device="cpu", dtype="float32")
    save_dictionary(tiny_dictionary(), root / "dict")
    corpus = str(make_corpus(root / "corpus"))
    hcfg = HarvestConfig(hooks=[HOOK], tokens=CFG.tokens, context=CFG.context, batch_size=CFG.batch_size,
                         dtype="float32", shard_tokens=640)  # fmt: skip
    harvest(model, corpus, root / "acts", hcfg, progress=False)
    return model, root, corpus


def test_an_atlas_from_the_store_equals_one_from_the_model(env) -> None:
    model, root, corpus = env
    one = build_atlas(model, root / "dict", corpus, out=root / "model.db", config=CFG, progress=False)
    two = build_atlas(model, root / "dict", corpus, out=root / "store.db", config=CFG, progress=False,
                      activations=root / "acts")  # fmt: skip
    for sql in TABLES:
        a, b = table_rows(one, sql), table_rows(two, sql)
        assert a and a == b, sql
    prov = table_rows(two, "SELECT value FROM meta WHERE key = 'provenance'")[0][0]
    assert '"activations": {"path"' in prov and '"dtype": "float32"' in prov


def test_a_store_that_does_not_match_is_refused(env, tmp_path: Path) -> None:
    model, root, corpus = env
    acts = root / "acts"
    cases = [
        (replace(CFG, context=16), corpus, "--context 32"),
        (replace(CFG, tokens=CFG.tokens * 4), corpus, "pass --tokens 2048 or harvest more"),
        (CFG, str(make_corpus(tmp_path / "other", n_docs=41)), "another corpus"),
    ]
    for cfg, corp, says in cases:
        with pytest.raises(AtlasError, match=says.replace("(", r"\(")):
            build_atlas(model, root / "dict", corp, out=tmp_path / "x.db", config=cfg, progress=False,
                        activations=acts)  # fmt: skip
        assert not (tmp_path / "x.db").exists()
