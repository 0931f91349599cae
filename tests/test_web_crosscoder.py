"""A crosscoder's atlas over two models (`lmscope atlas BASE --other OTHER`, or `lmscope diff`'s): every latent has
its relative decoder norm and band in the file; the explorer sorts and filters by them, shows them on the feature
page, and turns the one-model inspector off with the reason. A crosscoder without its second model is refused."""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from fastapi.testclient import TestClient

import lmscope
from atlas_helpers import CFG, HOOK, make_corpus
from lmscope.atlas import AtlasError, build_atlas
from lmscope.atlas.db import open_for_writing
from lmscope.atlas.db.write import write_latent_scaling
from lmscope.dictionaries import DictConfig, build
from lmscope.dictionaries.formats import save_dictionary
from lmscope.web.app import create_app
from lmscope.web.state import load_live
from tiny_models import save_tiny_with_tokenizer


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("xc")
    base = lmscope.load_model(save_tiny_with_tokenizer("llama", str(root / "model")), device="cpu", dtype="float32")
    hf = copy.deepcopy(base.hf)
    with torch.no_grad():
        for p in hf.model.layers[1].mlp.parameters():
            p.mul_(1.5)  # OTHER: a changed MLP
    other = lmscope.Model(hf, base.tokenizer, spec="tiny-other")
    cc = build(DictConfig(arch="batchtopk", d_in=64, d_sae=24, k=4, n_models=2, hook=HOOK, model="tiny"), seed=0)
    with torch.no_grad():
        cc.b_enc.fill_(0.05)
        cc.W_dec[0, :32] = 0  # latent 0 writes to OTHER only, latent 1 to BASE only
        cc.W_dec[1, 32:] = 0
        cc.threshold.fill_(0.0)  # type: ignore[operator]
    save_dictionary(cc, root / "cc")
    corpus = make_corpus(root / "corpus")
    with pytest.raises(AtlasError, match="--other OTHER"):
        build_atlas(base, root / "cc", str(corpus), out=root / "no.db", config=CFG, progress=False)
    atlas = build_atlas(base, root / "cc", str(corpus), out=root / "xc.db", config=CFG, progress=False, other=other)
    conn = open_for_writing(atlas)
    write_latent_scaling(conn, [(0, 0.05, 0.02, True)])
    conn.close()
    return SimpleNamespace(root=root, atlas=atlas, base=base, other=other, corpus=corpus)


@pytest.fixture()
def client(env: SimpleNamespace) -> TestClient:
    return TestClient(create_app(env.atlas), raise_server_exceptions=False)


def test_a_latents_relative_norm_band_and_scaling_are_on_its_page(client: TestClient) -> None:
    f = client.get("/api/features/0").json()
    assert f["crosscoder"] == {"relative_norm": 1.0, "band": "other-only", "nu_error": 0.05, "nu_recon": 0.02,
                               "robust": True}  # fmt: skip
    assert f["relative_norm"] == 1.0
    assert client.get("/api/features/1").json()["crosscoder"]["band"] == "base-only"
    assert client.get("/api/features/2").json()["crosscoder"]["nu_error"] is None  # not measured
    page = client.get("/features/0").text
    assert 'id="crosscoder-latent"' in page and "other-only" in page and "0.05" in page


def test_latents_sort_by_relative_norm_and_filter_by_band(client: TestClient) -> None:
    items = client.get("/api/features", params={"sort": "relative_norm", "order": "desc", "limit": 30}).json()["items"]
    rels = [it["relative_norm"] for it in items]
    assert rels[0] == 1.0 and rels == sorted(rels, reverse=True) and len(rels) == 24
    assert items[-1]["id"] == 1 and rels[-1] == 0.0
    only = client.get("/api/features", params={"band": "other-only"}).json()
    assert only["total"] == 1 and only["items"][0]["id"] == 0
    r = client.get("/features", params={"sort": "relative_norm", "band": "base-only"})
    assert r.status_code == 200 and 'href="/features/1"' in r.text and "rel. norm" in r.text
    assert client.get("/api/overview").json()["crosscoder_bands"]["other-only"] == 1


def test_the_one_model_inspector_is_off_for_a_crosscoder(env: SimpleNamespace) -> None:
    live, why = load_live(env.atlas, model="unused", dict_dir=env.root / "cc")
    assert live is None and "crosscoder" in why


def test_a_one_model_dictionary_refuses_a_second_model(env: SimpleNamespace, tmp_path: Path) -> None:
    sae = build(DictConfig(arch="topk", d_in=32, d_sae=8, k=2, hook=HOOK), seed=0)
    save_dictionary(sae, tmp_path / "sae")
    with pytest.raises(AtlasError, match="only for a two-model crosscoder"):
        build_atlas(env.base, tmp_path / "sae", str(env.corpus), out=tmp_path / "a.db", config=CFG, progress=False,
                    other=env.other)  # fmt: skip
