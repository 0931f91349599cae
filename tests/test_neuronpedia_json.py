"""The static export's feature JSON for circuit-tracer's attribution-graph viewer (lmscope.atlas.neuronpedia):
every file has exactly the viewer's fields with their types (circuit-tracer frontend/feature_models.py) and agrees
with the atlas, and a feature node of a graph lmscope exports resolves, by the viewer's rule, to the file that
`lmscope export` writes for that layer's atlas. Bad scan names are refused before anything is written."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

import lmscope
from atlas_helpers import CFG, make_corpus
from circuit_helpers import tiny_transcoders
from lmscope.atlas import AtlasError, build_atlas
from lmscope.atlas.neuronpedia import (
    CUSTOM,
    TOP_NAME,
    check_scan,
    model_name,
    node_feature_path,
    percentiles,
    scan_name,
)
from lmscope.atlas.store import AtlasStore
from lmscope.circuits import AttributionConfig, attribute
from lmscope.circuits.export import to_neuronpedia
from lmscope.dictionaries.formats import save_dictionary
from lmscope.errors import CircuitError
from lmscope.web.static_site import ExportError, export_static
from tiny_models import save_tiny_with_tokenizer, tiny_ids

LAYER = 1
# circuit-tracer frontend/feature_models.py: the viewer's feature file, field by field
FIELDS = {"transcoder_id": str, "index": int, "examples_quantiles": list, "top_logits": list, "bottom_logits": list,
          "act_min": float, "act_max": float, "quantile_values": list, "histogram": list,
          "activation_frequency": float}  # fmt: skip
EXAMPLE = {"tokens": list, "tokens_acts_list": list, "train_token_ind": int, "is_repeated_datapoint": bool}


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A tiny llama with random transcoders; layer 1's atlas, exported; a graph through the same transcoders."""
    root = tmp_path_factory.mktemp("npjson")
    model = lmscope.load_model(save_tiny_with_tokenizer("llama", str(root / "model")), device="cpu", dtype="float32")
    tcs = tiny_transcoders(model)
    save_dictionary(tcs[LAYER], root / "tc1")
    atlas = build_atlas(model, root / "tc1", str(make_corpus(root / "corpus")), out=root / "layer01.db", config=CFG,
                        progress=False)  # fmt: skip
    site = root / "site"
    summary = export_static(atlas, site)
    config = AttributionConfig(max_feature_nodes=None, max_edges_per_row=None)
    graph = attribute(model, tcs, tiny_ids()[0][:10], config)
    doc = to_neuronpedia(graph, "np", node_threshold=0.99, edge_threshold=0.99)
    store = AtlasStore(atlas)
    files = {int(p.stem): json.loads(p.read_text()) for p in (site / "features" / summary["scan"]).glob("*.json")}
    return SimpleNamespace(root=root, model=model, atlas=atlas, site=site, summary=summary, graph=graph, doc=doc,
                           store=store, files=files)  # fmt: skip


def _number(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def test_every_file_has_the_viewers_fields_and_types(env: SimpleNamespace) -> None:
    assert sorted(env.files) == list(range(env.store.n_features))
    for fid, doc in env.files.items():
        assert set(doc) == set(FIELDS), fid
        for key, kind in FIELDS.items():
            assert _number(doc[key]) if kind is float else isinstance(doc[key], kind) and not isinstance(doc[key], bool)
        assert doc["index"] == fid and doc["transcoder_id"] == env.summary["scan"]
        assert all(isinstance(t, str) for t in doc["top_logits"] + doc["bottom_logits"])
        assert all(_number(c) for c in doc["histogram"]) and all(_number(q) for q in doc["quantile_values"])
        for group in doc["examples_quantiles"]:
            assert set(group) == {"quantile_name", "examples"} and isinstance(group["quantile_name"], str)
            assert group["examples"], "a group without examples is left out"
            for ex in group["examples"]:
                assert set(ex) == set(EXAMPLE)
                assert all(isinstance(ex[k], v) for k, v in EXAMPLE.items())
                assert len(ex["tokens"]) == len(ex["tokens_acts_list"]) > 0
                assert all(isinstance(t, str) and "\n" not in t and "\t" not in t for t in ex["tokens"])
                assert all(_number(a) for a in ex["tokens_acts_list"])
                assert 0 <= ex["train_token_ind"] < len(ex["tokens"])


def test_the_files_agree_with_the_atlas(env: SimpleNamespace) -> None:
    fired = 0
    for fid, doc in env.files.items():
        f = env.store.feature(fid)
        assert f is not None
        assert doc["act_max"] == f["max_act"] and doc["act_min"] == 0.0
        assert doc["activation_frequency"] == f["density"] and doc["histogram"] == f["histogram"]["counts"]
        assert sum(doc["histogram"]) == f["n_fired"]
        effects = f["logit_effects"] or {"positive": [], "negative": []}
        assert doc["top_logits"] == [e["token"].replace("\n", "↵").replace("\t", "→") for e in effects["positive"]]
        assert len(doc["bottom_logits"]) == len(effects["negative"])
        q = doc["quantile_values"]
        assert len(q) == 100 and all(a <= b for a, b in itertools.pairwise(q))
        groups = doc["examples_quantiles"]
        if not f["n_fired"]:
            assert groups == [] and q == [0.0] * 100
            continue
        fired += 1
        assert q[-1] == pytest.approx(f["max_act"], rel=1e-4) and 0 < q[0] <= q[-1]
        # the top examples first, as the atlas has them; then the bins, highest first, their ranges apart
        assert groups[0]["quantile_name"] == TOP_NAME and len(groups[0]["examples"]) == len(f["top_examples"])
        for ex, src in zip(groups[0]["examples"], f["top_examples"], strict=True):
            peak = ex["tokens_acts_list"][ex["train_token_ind"]]
            assert ex["train_token_ind"] == src["peak"] and peak == pytest.approx(src["act"], rel=1e-4)
            for a, acted, special in zip(ex["tokens_acts_list"], src["acts"], src["special"], strict=True):
                assert a == (0.0 if special else pytest.approx(acted, rel=1e-4, abs=1e-6))
        first = groups[0]["examples"][0]
        assert first["tokens_acts_list"][first["train_token_ind"]] == pytest.approx(f["max_act"], rel=1e-4)
        peaks = [[ex["tokens_acts_list"][ex["train_token_ind"]] for ex in g["examples"]] for g in groups[1:]]
        for upper, lower in itertools.pairwise(peaks):
            assert min(upper) >= max(lower) - 1e-4
        # a (context, position) shown again is marked as repeated, the first time it is not
        seen: set[tuple[int, int]] = set()
        sources = [f["top_examples"]] + [b["examples"] for b in sorted(f["quantiles"], key=lambda b: -b["hi"])
                                         if b["examples"]]  # fmt: skip
        for g, src_group in zip(groups, sources, strict=True):
            for ex, src in zip(g["examples"], src_group, strict=True):
                key = (src["context"], src["pos"])
                assert ex["is_repeated_datapoint"] == (key in seen)
                seen.add(key)
    assert fired >= env.store.n_features // 2


def test_a_graph_node_resolves_to_its_layers_exported_file(env: SimpleNamespace) -> None:
    meta = env.doc["metadata"]
    # the viewer (init-cg-feature-detail.js): a "custom-" scan reads transcoder_list[node.layer]
    assert meta["scan"].startswith(CUSTOM) and len(meta["transcoder_list"]) == env.model.n_layers
    assert env.summary["scan"] == meta["transcoder_list"][LAYER] == scan_name(str(env.atlas.parent / "model"),
                                                                              f"blocks.{LAYER}.mlp_in")  # fmt: skip
    nodes = [n for n in env.doc["nodes"] if n["feature_type"] == "cross layer transcoder" and n["layer"] == str(LAYER)]
    assert nodes, "the graph keeps some layer-1 features"
    for n in nodes:
        path = node_feature_path(env.doc, n)
        assert path == f"features/{env.summary['scan']}/{n['feature']}.json"
        assert (env.site / path).is_file() and env.files[n["feature"]]["index"] == n["feature"]
    others = [n for n in env.doc["nodes"] if n["feature_type"] != "cross layer transcoder"]
    assert others and all(node_feature_path(env.doc, n) is None for n in others)


def test_scan_names() -> None:
    assert scan_name("smollm2-135m", "blocks.10.resid_post") == "smollm2-135m-blocks.10.resid_post"
    assert model_name("HuggingFaceTB/SmolLM2-135M") == "SmolLM2-135M" and model_name("/tmp/x/my model/") == "my-model"
    assert model_name("<in-memory>") == "in-memory" and model_name("///") == "model"
    for bad in ("a/b", "a\\b", "..", ".", ".hidden", "", "-x", "x" * 101, f"{CUSTOM}x", "a b"):
        with pytest.raises(AtlasError):
            check_scan(bad)
    assert check_scan("gpt2-L3_v1.0") == "gpt2-L3_v1.0"


def test_percentiles_interpolate_in_the_histogram() -> None:
    q = percentiles([0, 10, 0, 10], 1.0, 3.8)  # bins [0,1) [1,2) [2,3) [3,4); the largest value is 3.8
    assert len(q) == 100 and q[24] == 1.5 and q[49] == 2.0 and q[74] == 3.5 and q[99] == 3.8
    assert percentiles([0, 0], 1.0, 0.0, n=3) == [0.0, 0.0, 0.0] and percentiles([], 0.0, 0.0, n=2) == [0.0, 0.0]


def test_bad_scans_are_refused_and_out_is_untouched(env: SimpleNamespace, tmp_path: Path) -> None:
    for bad, message in (("../up", "one folder"), ("a/b", "no '/'"), ("index.json", "site's own files"),
                         ("7.html", "site's own files"), (f"{CUSTOM}x", "per-layer")):  # fmt: skip
        with pytest.raises(ExportError, match=message):
            export_static(env.atlas, tmp_path / "out", scan=bad)
    assert not list(tmp_path.iterdir())
    r = export_static(env.atlas, tmp_path / "named", limit=3, scan="my-scan")
    assert r["scan"] == "my-scan"
    assert sorted(p.name for p in (tmp_path / "named" / "features" / "my-scan").iterdir()) == [
        "0.json", "1.json", "2.json"]  # fmt: skip
    from lmscope.cli.app import app

    res = CliRunner().invoke(app, ["export", str(env.atlas), "--static", str(tmp_path / "cli"), "--scan", "a/b"])
    assert res.exit_code != 0 and "a scan names one folder" in res.output and not (tmp_path / "cli").exists()
    res = CliRunner().invoke(app, ["export", str(env.atlas), "--static", str(tmp_path / "cli"), "--limit", "2",
                                   "--no-progress"])  # fmt: skip
    assert res.exit_code == 0 and f"features/{env.summary['scan']}/ID.json" in res.output.replace("\n", "")


def test_the_graph_export_refuses_bad_scans(env: SimpleNamespace) -> None:
    graph = env.graph
    with pytest.raises(CircuitError, match="one a layer"):
        to_neuronpedia(graph, "g", scans=["a"])
    with pytest.raises(CircuitError, match="one folder"):
        to_neuronpedia(graph, "g", scans=["a/b"] * graph.n_layers)
    doc = to_neuronpedia(graph, "g", scans=[f"s{i}" for i in range(graph.n_layers)])
    assert doc["metadata"]["transcoder_list"] == [f"s{i}" for i in range(graph.n_layers)]
