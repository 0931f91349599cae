"""Feature families and the 2-D map (lmscope.atlas.families): planted structure is recovered, labels name what the
members share, the optional tables round-trip and are replaced atomically, older atlases read as "no map", and the
CLI command, the JSON API, the pages and the static export carry them; bad input gets one clear line."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sklearn.metrics import adjusted_rand_score
from typer.testing import CliRunner

from atlas_helpers import CFG, make_tiny_atlas, tiny_dictionary
from lmscope.atlas import build_atlas
from lmscope.atlas.db import read
from lmscope.atlas.db.families import families_meta, family_rows, has_families, map_points, write_families
from lmscope.atlas.db.schema import open_atlas, open_for_writing
from lmscope.atlas.families import (
    FamilyConfig,
    FamilyError,
    add_families,
    auto_levels,
    cofire_pairs,
    compute_families,
    distance_matrix,
    hierarchy,
    layout,
    map_agreement,
    map_neighbours,
    name_sub_families,
    unit_rows,
)
from lmscope.atlas.family_labels import base_rates, label_family, member_terms
from lmscope.atlas.family_map import family_detail, feature_families, map_payload
from lmscope.cli.app import app
from lmscope.dictionaries.formats import save_dictionary
from lmscope.web.app import create_app
from lmscope.web.static_site import export_static

runner = CliRunner()


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A tiny atlas built with families (the default) and one of the same inputs built without them."""
    root = tmp_path_factory.mktemp("families")
    model, d, corpus, atlas = make_tiny_atlas(root, labels=True)
    bare = build_atlas(model, root / "dict", str(corpus), out=root / "bare.db", config=_no_families(), progress=False)
    return SimpleNamespace(root=root, model=model, d=d, atlas=atlas, bare=bare, dict=root / "dict")


def _no_families():
    from dataclasses import replace

    return replace(CFG, families=False)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copy(src, dst)
    return dst


# ---------------------------------------------------------------------------------------------------- planted
def _groups(n_groups: int = 6, per: int = 20, dim: int = 64, noise: float = 0.3, seed: int = 0) -> tuple:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_groups, dim))
    truth = np.repeat(np.arange(n_groups), per)
    w = centres[truth] / np.sqrt(dim) + noise * rng.standard_normal((len(truth), dim)) / np.sqrt(dim)
    perm = rng.permutation(len(truth))  # the groups are not contiguous ids
    return w[perm], truth[perm]


def _no_cofire() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)


def test_the_hierarchy_recovers_planted_decoder_groups() -> None:
    w, truth = _groups()
    units = unit_rows(w)
    d = distance_matrix(units, _no_cofire(), 0.0)
    (fam,) = hierarchy(d.copy(), (6,))
    assert adjusted_rand_score(truth, fam) == 1.0
    coarse, fine = hierarchy(d.copy(), (3, 6))
    for f in range(6):  # the cuts of one tree nest: each fine family lies in one coarse family
        assert len(set(coarse[fine == f].tolist())) == 1
    assert sorted(np.bincount(fam).tolist(), reverse=True) == np.bincount(fam).tolist()  # 0 is the largest


def test_the_map_puts_group_members_closer_than_non_members() -> None:
    w, truth = _groups()
    units = unit_rows(w)
    d = distance_matrix(units, _no_cofire(), 0.0)
    y = layout(d, units, FamilyConfig())
    assert y.shape == (len(truth), 2) and np.isfinite(y).all()
    same = truth[:, None] == truth[None, :]
    np.fill_diagonal(same, False)
    dist = np.linalg.norm(y[:, None] - y[None, :], axis=-1)
    assert dist[same].mean() < 0.5 * dist[~same & ~np.eye(len(y), dtype=bool)].mean()
    assert map_agreement(map_neighbours(y), truth) > 0.9
    assert map_agreement(map_neighbours(y), np.random.default_rng(1).permutation(truth)) < 0.4


def test_cofiring_alone_recovers_groups_the_decoder_does_not_show() -> None:
    rng = np.random.default_rng(0)
    n, groups = 60, 4
    truth = rng.permutation(np.repeat(np.arange(groups), n // groups))
    units = unit_rows(rng.standard_normal((n, 64)))  # no decoder structure at all
    ids = list(range(n))
    lists: dict[int, list[list[float]]] = {i: [] for i in ids}
    for i in ids:  # each pair of a group co-fires on 10 of each one's 20 sampled firings
        lists[i] = [[j, 10, 0.5] for j in ids if j != i and truth[j] == truth[i]]
    cof = cofire_pairs(ids, lists)
    assert np.allclose(cof[2], 0.5)  # c / sqrt(n_i n_j) = 10 / 20
    (with_cofire,) = hierarchy(distance_matrix(units, cof, 0.5), (groups,))
    (decoder_only,) = hierarchy(distance_matrix(units, cof, 0.0), (groups,))
    assert adjusted_rand_score(truth, with_cofire) == 1.0
    assert adjusted_rand_score(truth, decoder_only) < 0.3


def test_cofire_pairs_are_symmetric_cosines_of_firing_patterns() -> None:
    # i fired on 10 sampled tokens, j on 40; together on 5: cos = 5 / sqrt(10 * 40) = 0.25
    r, c, v = cofire_pairs([7, 9], {7: [[9, 5, 0.5]], 9: [[7, 5, 0.125]]})
    got = {(int(a), int(b)): float(x) for a, b, x in zip(r, c, v, strict=True)}
    assert got == {(0, 1): pytest.approx(0.25), (1, 0): pytest.approx(0.25)}


def test_auto_levels() -> None:
    assert auto_levels(4608) == (18, 72, 288)
    assert auto_levels(48) == (2, 3)
    assert auto_levels(2) == (1,)


# ---------------------------------------------------------------------------------------------------- labels
def test_a_family_is_labelled_by_what_most_members_share() -> None:
    terms = {i: member_terms([" 7", "7"], "digits after a page") for i in range(7)}
    terms |= {i: member_terms(["the"], "articles") for i in range(7, 9)}
    terms |= {i: member_terms(["the", ","], None) for i in range(9, 60)}  # the rest of the dictionary
    base = base_rates(terms)
    label, rows = label_family(list(range(9)), terms, base, {})
    assert label.startswith("7 of 9 members: ‘7’") and "7 of 9: ‘digits’" in label
    assert rows[0]["shared"] and rows[0]["count"] == 7 and rows[0]["share"] == pytest.approx(7 / 9, abs=1e-4)
    # 'the' is in most of these members but in most features too: it names nothing
    label, rows = label_family([9, 10, 11, 12], terms, base, {})
    assert label == "mixed: 4 of 4 members have ‘,’, but so do 85% of all features"
    assert not any(r["shared"] for r in rows)
    label, _ = label_family([0, 7, 9], {0: {"a": "token"}, 7: {"b": "token"}, 9: {"c": "token"}}, base, {})
    assert label.startswith("mixed: no term shared by 50% of the 3 members")
    assert label_family([3], terms, base, {3: "digits"})[0] == "one member: #3 digits"


def test_a_mixed_coarse_family_names_its_named_sub_families() -> None:
    def row(fid, level, parent, size, label, shared_term=None, count=0):
        terms = [{"term": shared_term, "kind": "token", "count": count, "share": count / size, "base": 0.01,
                  "shared": True}] if shared_term else []  # fmt: skip
        return (fid, level, parent, size, label, json.dumps(terms), 0.0, 0.0, None, None, "[]")

    rows = [row(0, 0, None, 9, "mixed: x"), row(1, 0, None, 3, "3 of 3 members: ‘a’", "a", 3),
            row(2, 1, 0, 5, "4 of 5 members: ‘0’", "0", 4), row(3, 1, 0, 4, "3 of 4 members: ‘7’", "7", 3),
            row(4, 1, 1, 3, "3 of 3 members: ‘a’", "a", 3)]  # fmt: skip
    out = name_sub_families(rows)
    assert out[0][4] == "mixed: x; named within: ‘0’ 4/5, ‘7’ 3/4"
    assert out[1][4] == "3 of 3 members: ‘a’"  # named itself: left as it is
    assert out[2:] == rows[2:]


def test_member_terms_read_tokens_and_label_words() -> None:
    t = member_terms([" The", "\n", "  "], "mostly the tokens ' court', ' law' in prose")
    assert t["the"] == "token" and t["↵"] == "token" and t["␣␣"] == "token"
    assert {"court", "law", "prose"} <= set(t) and "mostly" not in t and "tokens" not in t


# ---------------------------------------------------------------------------------------------------- the atlas
def test_a_build_stores_families_and_a_map(env: SimpleNamespace) -> None:
    conn = open_atlas(env.atlas)
    assert has_families(conn)
    live = read.live_feature_ids(conn)
    pts = map_points(conn)
    assert [p[0] for p in pts] == live
    meta = families_meta(conn)
    assert meta is not None and meta["levels"] == list(auto_levels(len(live))) and meta["dead_excluded"] == 0
    fams = family_rows(conn)
    for li, k in enumerate(meta["levels"]):
        level = [f for f in fams if f["level"] == li]
        assert len(level) == k
        assert sorted(m for f in level for m in f["members"]) == live  # every live feature once per level
        assert [f["id"] for f in level] == list(range(meta["level_offsets"][li], meta["level_offsets"][li] + k))
    by_id = {f["id"]: f for f in fams}
    for fid, _x, _y, chain in pts:
        assert len(chain) == len(meta["levels"])
        for li, f in enumerate(chain):
            assert fid in by_id[f]["members"] and by_id[f]["level"] == li
            if li:
                assert by_id[f]["parent"] == chain[li - 1]
    q = meta["quality"][-1]
    assert {"cos_within", "cos_within_shuffled", "labelled", "labelled_shuffled", "map_agreement"} <= set(q)
    detail = family_detail(conn, pts[0][3][-1])
    assert detail is not None and detail["parent"]["id"] == pts[0][3][-2] and detail["members"][0]["id"] >= 0
    assert [f["id"] for f in feature_families(conn, pts[0][0]) or []] == pts[0][3]
    conn.close()


def test_an_atlas_without_families_reads_as_no_map_and_gets_them_from_the_command(
    env: SimpleNamespace, tmp_path: Path
) -> None:
    atlas = _copy(env.bare, tmp_path / "old.db")
    conn = open_atlas(atlas)
    assert not has_families(conn) and map_payload(conn) is None and feature_families(conn, 0) is None
    conn.close()
    client = TestClient(create_app(atlas))
    r = client.get("/api/map")
    assert r.status_code == 404 and f"lmscope families {atlas}" in r.json()["detail"]
    assert client.get("/api/families").status_code == 404
    page = client.get("/map")
    assert page.status_code == 200 and 'id="map-none"' in page.text and "lmscope families" in page.text
    assert 'id="families-none"' in client.get("/features/0").text
    res = runner.invoke(app, ["families", str(atlas), "--levels", "2,5", "--seed", "1"])
    assert res.exit_code == 0, res.output
    assert "level 1: 5 families" in res.output and "decoder cosine" in res.output
    conn = open_atlas(atlas)
    assert has_families(conn) and families_meta(conn)["levels"] == [2, 5]
    conn.close()


def test_dead_features_have_no_place(env: SimpleNamespace, tmp_path: Path) -> None:
    atlas = _copy(env.atlas, tmp_path / "dead.db")
    raw = sqlite3.connect(atlas)
    raw.execute("UPDATE features SET dead = 1, n_fired = 0 WHERE id IN (0, 5)")
    raw.commit()
    raw.close()
    meta = add_families(atlas, env.dict, FamilyConfig(levels=(2, 4)))
    assert meta["dead_excluded"] == 2 and meta["live"] == 46
    conn = open_atlas(atlas)
    assert {p[0] for p in map_points(conn)}.isdisjoint({0, 5}) and feature_families(conn, 5) == []
    conn.close()
    assert "a dead feature has no family" in TestClient(create_app(atlas)).get("/features/5").text


def test_recomputing_is_atomic(env: SimpleNamespace, tmp_path: Path) -> None:
    atlas = _copy(env.atlas, tmp_path / "atomic.db")
    conn = open_for_writing(atlas)
    before = (family_rows(conn), map_points(conn), families_meta(conn))
    with pytest.raises(sqlite3.Error):  # a row of the wrong width fails mid-write, after the old tables were dropped
        write_families(conn, [(0, 0)], [], {"broken": True})
    assert (family_rows(conn), map_points(conn), families_meta(conn)) == before
    conn.close()


def test_bad_input_gets_one_clear_line(env: SimpleNamespace, tmp_path: Path) -> None:
    with pytest.raises(FamilyError, match="between 0 and 1"):
        FamilyConfig(cofire_weight=1.5)
    with pytest.raises(FamilyError, match="increasing"):
        FamilyConfig(levels=(8, 4))
    conn = open_atlas(env.atlas)
    with pytest.raises(FamilyError, match="only 48 live features; ask for at most 48"):
        compute_families(conn, env.d.W_dec, FamilyConfig(levels=(2, 49)))
    with pytest.raises(FamilyError, match="raise --max-features to 48"):
        compute_families(conn, env.d.W_dec, FamilyConfig(max_features=40))
    with pytest.raises(FamilyError, match="rows but the atlas 48 features"):
        compute_families(conn, env.d.W_dec[:10], FamilyConfig())
    conn.close()
    other = tmp_path / "other-dict"
    d2 = tiny_dictionary()
    d2.W_dec.data.mul_(2)  # the same shape, other weights
    save_dictionary(d2, other)
    atlas = _copy(env.atlas, tmp_path / "x.db")
    with pytest.raises(FamilyError, match=r"is not the dictionary .* was built with"):
        add_families(atlas, other)
    res = runner.invoke(app, ["families", str(atlas), "--dict", str(other)])
    assert res.exit_code == 2 and "is not the dictionary" in res.output and "Traceback" not in res.output
    for args, words in (
        (["--cofire-weight", "-0.1"], "between 0 and 1"),
        (["--levels", "4,x"], "separated by commas"),
        (["--levels", "1000"], "ask for at most 48"),
    ):
        res = runner.invoke(app, ["families", str(atlas), *args])
        assert res.exit_code == 2 and words in " ".join(res.output.split()), res.output
    res = runner.invoke(app, ["families", str(tmp_path / "missing.db")])
    assert res.exit_code == 2 and "does not exist" in res.output


# ---------------------------------------------------------------------------------------------------- the web
def test_the_api_and_pages(env: SimpleNamespace) -> None:
    client = TestClient(create_app(env.atlas))
    m = client.get("/api/map").json()
    n = len(m["points"]["id"])
    assert n == 48 and len(m["points"]["x"]) == n and len(m["points"]["families"][0]) == len(m["levels"])
    assert "members" not in m["families"][0] and m["meta"]["quality"]
    assert m["points"]["label"][m["points"]["id"].index(1)] == "capital cities"  # the human label of the helper
    lv = client.get("/api/families", params={"level": 1}).json()["families"]
    assert len(lv) == m["levels"][1] and all(f["level"] == 1 for f in lv)
    assert client.get("/api/families", params={"level": 9}).status_code == 404
    fam = client.get(f"/api/families/{lv[0]['id']}").json()
    assert fam["size"] == len(fam["members"]) and fam["parent"] is not None
    assert client.get("/api/families/99999").status_code == 404
    assert client.get("/api/families/99999999999999999999999").status_code in (404, 422)
    chain = client.get("/api/features/1/families").json()["families"]
    assert [c["level"] for c in chain] == list(range(len(m["levels"])))
    assert client.get("/api/features/4800/families").status_code == 404
    page = client.get("/map")
    assert page.status_code == 200 and 'id="map-data"' in page.text and 'id="map-quality"' in page.text
    data = json.loads(page.text.split('id="map-data">')[1].split("</script>")[0])
    assert data["links"] == {"static": False, "exported": 48} and "members" in data["families"][0]
    feature = client.get("/features/1").text
    assert 'id="families"' in feature and f'href="/map#family-{chain[-1]["id"]}"' in feature
    assert 'id="nav-map"' in client.get("/").text


def test_the_static_export_carries_the_map(env: SimpleNamespace, tmp_path: Path) -> None:
    export_static(env.atlas, tmp_path / "site", limit=10)
    html = (tmp_path / "site" / "map.html").read_text()
    assert 'src="static/map.js"' in html and 'id="map-data"' in html
    data = json.loads(html.split('id="map-data">')[1].split("</script>")[0])
    assert data["links"] == {"static": True, "exported": 10}
    feature = (tmp_path / "site" / "features" / "1.html").read_text()
    assert 'href="../map.html#family-' in feature


def test_a_build_whose_families_fail_is_complete_without_them(
    env: SimpleNamespace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import lmscope.atlas.families as families

    def broken(*args, **kwargs):
        raise RuntimeError("planted failure")

    monkeypatch.setattr(families, "compute_families", broken)
    said: list[str] = []
    out = build_atlas(env.model, env.dict, str(env.root / "corpus"), out=tmp_path / "a.db", config=CFG,
                      progress=False, log=said.append)  # fmt: skip
    conn = open_atlas(out)  # complete and readable
    assert not has_families(conn)
    conn.close()
    assert any("no feature families" in m and "planted failure" in m and "lmscope families" in m for m in said)
