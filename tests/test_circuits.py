"""Attribution graphs are exact on tiny random models of every family that supports circuits.

For each family: every checked edge equals the effect measured by perturbing its source in the frozen replacement
model (a forward pass, no gradients); the nodes' contributions plus the constant terms add up to each target; the
second derivative through the frozen points is zero; families that cannot freeze attention are refused.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from circuit_helpers import CIRCUIT_FAMILIES, tiny_circuit
from lmscope import Model
from lmscope.circuits import Replacement, record
from lmscope.circuits.attribute import AttributionConfig, attribute
from lmscope.circuits.graph import Graph
from lmscope.errors import CircuitError
from tiny_models import TINY, tiny_ids

SKIP = "+skip"  # a family name with this suffix uses skip-transcoders (an affine x @ W_skip beside the code)
WITH_SKIP = ["llama+skip", "gpt2+skip", "gemma2+skip"]


@functools.cache
def built(family: str):  # type: ignore[no-untyped-def]
    model, tcs, ids, graph = tiny_circuit(family.removesuffix(SKIP), skip=family.endswith(SKIP))
    rec = record(model, tcs, ids)
    return model, tcs, ids, graph, rec, Replacement(model, tcs, rec)


def _target_value(graph: Graph, node: int, logits: torch.Tensor, mlp_in: dict[int, torch.Tensor], tcs) -> float:  # type: ignore[no-untyped-def]
    """A target node's value in one replacement run: a demeaned logit, or a feature's pre-activation."""
    d = graph.describe(node)
    if d["kind"] == "target":
        last = logits[0, -1].double()
        c = last - last.mean()
        return float(c[d["tokens"]].sum() - (c[d["minus"]].sum() if d["minus"] else 0))
    t = tcs[d["layer"]]
    x = mlp_in[d["layer"]][0, d["pos"]].double()
    return float(x.detach() @ t.W_enc[:, d["feature"]].double().detach() + t.b_enc[d["feature"]].double().detach())


def _perturbed(rep: Replacement, graph: Graph, tcs, source: int, delta: float):  # type: ignore[no-untyped-def]
    """One forward run of the frozen replacement model with `source` scaled up by `delta` (features held)."""
    rec = rep.rec
    d = graph.describe(source)
    embed = rec.embed.unsqueeze(0).clone()
    extra: dict[int, tuple[int, torch.Tensor]] = {}
    if d["kind"] == "token":
        embed[0, d["pos"]] += delta * rec.embed[d["pos"]]
    elif d["kind"] == "error":
        extra[d["layer"]] = (d["pos"], delta * rec.error[d["layer"]][d["pos"]])
    else:
        extra[d["layer"]] = (d["pos"], delta * tcs[d["layer"]].W_dec[d["feature"]].detach())

    def mlp_out(i: int, _x: torch.Tensor) -> torch.Tensor:
        out = rec.mlp_out[i].unsqueeze(0).clone()
        if i in extra:
            p, v = extra[i]
            out[0, p] += v.to(out.dtype)
        return out

    with torch.no_grad():
        return rep.run(embed, mlp_out)


def _targets_to_check(graph: Graph) -> list[int]:
    last = graph.n_layers - 1
    feats = [n for n in range(graph.n_features) if graph.feat_layer[n] == last][:2]
    mid = [n for n in range(graph.n_features) if graph.feat_layer[n] == 1][:1]
    return [graph.target_start, *feats, *mid]


def _sources(graph: Graph, target: int, rng: np.random.Generator) -> list[int]:
    row = graph.adjacency[target].toarray().ravel()
    nz = np.nonzero(row)[0]
    by_kind: dict[str, list[int]] = {}
    for n in nz.tolist():
        by_kind.setdefault(graph.kind(n), []).append(n)
    out: list[int] = []
    for _kind, nodes in sorted(by_kind.items()):
        pick = rng.choice(len(nodes), size=min(4, len(nodes)), replace=False)
        out += [nodes[i] for i in pick]
    return out


@pytest.mark.parametrize("family", CIRCUIT_FAMILIES + WITH_SKIP)
def test_edges_equal_measured_perturbations(family: str) -> None:
    _model, tcs, _ids, graph, _rec, rep = built(family)
    base_logits, base_in = _perturbed(rep, graph, tcs, graph.token_start, 0.0)
    rng = np.random.default_rng(0)
    checked = 0
    for target in _targets_to_check(graph):
        row = graph.adjacency[target].toarray().ravel()
        scale = float(np.abs(row).max())
        assert scale > 0, f"{family}: target {graph.describe(target)} has no edges"
        base = _target_value(graph, target, base_logits, base_in, tcs)
        for source in _sources(graph, target, rng):
            logits, mlp_in = _perturbed(rep, graph, tcs, source, 1.0)
            measured = _target_value(graph, target, logits, mlp_in, tcs) - base
            if graph.kind(source) == "feature":
                measured *= float(graph.feat_act[source])
            edge = float(row[source])
            assert abs(measured - edge) <= 2e-4 * scale + 1e-6, (
                f"{family}: edge {graph.describe(source)} -> {graph.describe(target)} is {edge:.6g}, the frozen "
                f"replacement model says {measured:.6g}"
            )
            checked += 1
    assert checked >= 10


@pytest.mark.parametrize("family", CIRCUIT_FAMILIES + WITH_SKIP)
def test_contributions_add_up_to_each_target(family: str) -> None:
    _model, tcs, _ids, graph, rec, rep = built(family)
    zero = torch.zeros_like(rec.embed).unsqueeze(0)
    with torch.no_grad():  # the constant terms: every source at zero, biases alone
        # (an MlpOut gives the skip term at the recorded input; the hooks add the rest: see Replacement)
        logits, mlp_in = rep.run(zero, lambda i, _x: (tcs[i].b_dec.detach() + tcs.skip(i, rec.mlp_in[i])).unsqueeze(0))
    for target in _targets_to_check(graph):
        total = float(graph.adjacency[target].toarray().astype(np.float64).sum())
        const = _target_value(graph, target, logits, mlp_in, tcs)
        if graph.kind(target) == "target":
            value = graph.targets[0]["value"]
        else:
            d = graph.describe(target)
            t = tcs[d["layer"]]
            value = float(
                rec.mlp_in[d["layer"]][d["pos"]] @ t.W_enc[:, d["feature"]].detach() + t.b_enc[d["feature"]].detach()
            )
        scale = float(np.abs(graph.adjacency[target].toarray()).sum())
        assert abs(total + const - value) <= 1e-4 * max(scale, abs(value)), (family, graph.describe(target))


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox", "gemma2", "llama+skip"])
def test_second_derivative_through_frozen_points_is_zero(family: str) -> None:
    """The gradient is the same at the recorded point and far from it: the Jacobian is constant, so every second
    derivative is zero. (A double backward cannot check this directly: PyTorch's fused CPU attention kernel has no
    second derivative, whether or not it would be zero.)"""
    model, _tcs, _ids, graph, rec, rep = built(family)

    def gradients(shift: float) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(1)
        embed = (rec.embed + shift * torch.randn(rec.embed.shape, generator=g)).unsqueeze(0).requires_grad_(True)
        leaves = {
            i: (rec.mlp_out[i] + shift * torch.randn(rec.mlp_out[i].shape, generator=g))
            .unsqueeze(0)
            .requires_grad_(True)
            for i in range(model.n_layers)
        }
        logits, _ = rep.run(embed, lambda i, _x: leaves[i], grad=True)
        target = logits[0, -1, graph.targets[0]["tokens"][0]]
        return list(torch.autograd.grad(target, [embed, *leaves.values()], allow_unused=True))

    here, far = gradients(0.0), gradients(3.0)
    for a, b in zip(here, far, strict=True):
        if a is None:
            assert b is None
            continue
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(a.abs().max()))
    moved = gradients(3.0)[0]
    assert torch.equal(moved, far[0])  # deterministic


@pytest.mark.parametrize("family", ["llama", "llama+skip"])
def test_replacement_run_reproduces_the_real_model(family: str) -> None:
    model, _tcs, ids, _graph, _rec, rep = built(family)
    with torch.no_grad():
        logits, _ = rep.run()
        real = model(ids.unsqueeze(0))
    assert real is not None
    torch.testing.assert_close(logits, real, rtol=1e-5, atol=1e-5)
    assert model.hooks_active() == 0


@pytest.mark.parametrize("family", ["bert"])
def test_a_family_that_cannot_freeze_attention_is_refused(family: str) -> None:
    model = Model(TINY[family].build())
    with pytest.raises(CircuitError, match=r"cannot freeze attention in the bert family.*post-LayerNorm"):
        attribute(model, tiny_transcoders_any(model), tiny_ids()[0][:6])


def tiny_transcoders_any(model: Model):  # type: ignore[no-untyped-def]
    from lmscope.circuits.transcoders import TranscoderSet
    from lmscope.dictionaries.base import DictConfig, build

    d = model.d_model
    return TranscoderSet({0: build(DictConfig(arch="topk", d_in=d, d_sae=16, d_out=d, k=2, hook="blocks.0.mlp_in",
                                              hook_out="blocks.0.mlp_out"))})  # fmt: skip


def test_bad_input_is_refused_with_one_clear_line() -> None:
    model, tcs, ids, _graph, _rec, _rep = built("llama")
    with pytest.raises(CircuitError, match="at most 5"):
        attribute(model, tcs, ids, AttributionConfig(max_prompt_tokens=5))
    partial = type(tcs)({i: tcs[i] for i in tcs.layers[:-1]})
    with pytest.raises(CircuitError, match="no transcoder for layers"):
        attribute(model, partial, ids)
    wrong = type(tcs)({i: tcs[i] for i in tcs.layers})
    wrong.by_layer[0].cfg.model = "some-other-model"
    for t in wrong.by_layer.values():
        t.cfg.model = "some-other-model"
    model.spec = "tiny-llama"
    try:
        with pytest.raises(CircuitError, match="was trained on 'some-other-model', not 'tiny-llama'"):
            attribute(model, wrong, ids)
    finally:
        model.spec = "<in-memory>"
        for t in wrong.by_layer.values():
            t.cfg.model = None


def test_capped_rows_record_what_they_drop() -> None:
    model, tcs, ids, full = tiny_circuit("llama")
    capped = attribute(model, tcs, ids, AttributionConfig(max_feature_nodes=None, max_edges_per_row=8))
    per_row = np.diff(capped.adjacency[: capped.error_start].indptr)  # feature rows: their feature edges
    feats_per_row = [int((capped.adjacency[r].indices < capped.error_start).sum()) for r in range(capped.n_nodes)]
    assert max(feats_per_row) <= 8 and per_row.max() > 8  # error and token edges are never capped
    dropped = capped.meta["dropped"]
    assert dropped["rows_capped"] > 0 and 0 < dropped["max_abs_frac"] < 1
    # the kept edges are the largest ones of the exact rows
    t = full.target_start
    exact = np.sort(np.abs(full.adjacency[t].toarray().ravel()))[::-1][:8]
    kept = np.sort(np.abs(capped.adjacency[t].toarray().ravel()))[::-1][:8]
    np.testing.assert_allclose(kept, exact, rtol=1e-5)


def test_feature_budget_visits_the_most_influential_first() -> None:
    model, tcs, ids, full = tiny_circuit("llama")
    small = attribute(model, tcs, ids, AttributionConfig(max_feature_nodes=10, max_edges_per_row=None, batch_size=4))
    assert small.n_features == 10 and small.meta["n_visited_features"] == 10
    assert small.meta["n_active_features"] == full.n_features


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2", "llama+skip"])
def test_intervention_prediction_equals_constrained_patching(family: str) -> None:
    from lmscope.circuits.intervene import check_interventions, parse_intervention

    model, tcs, _ids, graph, _rec, _rep = built(family)
    node = next(n for n in range(graph.n_features) if graph.feat_layer[n] == 0)
    d = graph.describe(node)
    iv = parse_intervention(f"{d['layer']}:{d['feature']}:{d['pos']}=0")
    out = check_interventions(model, tcs, graph, [iv])
    assert out["features"], "a layer-0 feature must have downstream feature nodes"
    for row in out["targets"] + out["features"]:
        assert abs(row["predicted"] - row["constrained"]) <= 1e-4 * max(1.0, abs(row["predicted"])), row
    # with features free to respond, and with attention free, the effect differs (here it must: 3 layers of MLPs)
    assert any(abs(r["frozen_attention"] - r["constrained"]) > 1e-6 for r in out["features"])
    assert {"free", "frozen_attention"} <= set(out["targets"][0])


def test_intervention_bad_input() -> None:
    from lmscope.circuits.intervene import check_interventions, parse_intervention

    with pytest.raises(CircuitError, match="LAYER:FEATURE:POS=VALUE"):
        parse_intervention("3:12=1")
    with pytest.raises(CircuitError, match="finite"):
        parse_intervention("1:2:3=inf")
    model, tcs, _ids, graph, _rec, _rep = built("llama")
    with pytest.raises(CircuitError, match="not a node of this graph"):
        check_interventions(model, tcs, graph, [parse_intervention("0:63:0=1")] if graph.feature_node(0, 0, 63) is None
                            else [parse_intervention("0:62:0=1")])  # fmt: skip


def test_graph_file_round_trip_and_corruption(tmp_path) -> None:  # type: ignore[no-untyped-def]
    _model, _tcs, _ids, graph, _rec, _rep = built("llama")
    path = graph.save(tmp_path / "g.safetensors")
    back = Graph.load(path)
    assert back.n_nodes == graph.n_nodes and back.targets == graph.targets
    assert (back.adjacency != graph.adjacency).nnz == 0
    np.testing.assert_array_equal(back.feat_id, graph.feat_id)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CircuitError, match="not an lmscope attribution graph"):
        Graph.load(bad)


@pytest.mark.parametrize(
    ("family", "module", "q", "k"),
    [
        ("llama", "model.layers.1.self_attn.{}_proj", None, None),
        ("gpt2", "transformer.h.1.attn.c_attn", slice(0, 32), slice(32, 64)),
        ("gpt_neox", "gpt_neox.layers.1.attention.query_key_value", "neox-q", "neox-k"),
    ],
)
def test_attn_q_and_k_are_the_projections_by_hand(family: str, module: str, q: object, k: object) -> None:
    """attn_q/attn_k against the projection outputs read with a plain PyTorch hook (fused layouts written by hand
    from the HF source); writing the recorded values back leaves the logits bit-identical, other values do not."""
    model = Model(TINY[family].build())
    ids = tiny_ids()
    seen: dict[str, torch.Tensor] = {}
    names = [module.format("q"), module.format("k")] if q is None else [module]
    handles = [model.hf.get_submodule(n).register_forward_hook(
        lambda _m, _a, out, n=n: seen.__setitem__(n, out.detach().clone())) for n in names]  # fmt: skip
    try:
        with torch.no_grad():
            plain = model.hf(input_ids=ids).logits
    finally:
        for h in handles:
            h.remove()
    with model.capture(["blocks.1.attn_q", "blocks.1.attn_k"], stop_early=False) as acts:
        model(ids)
    if q is None:
        want_q, want_k = seen[names[0]], seen[names[1]]
    elif q == "neox-q":
        heads = seen[names[0]].view(*ids.shape, 4, 24)  # [..., heads, 3 * head_dim]: q | k | v per head
        want_q, want_k = heads[..., :8].reshape(*ids.shape, 32), heads[..., 8:16].reshape(*ids.shape, 32)
    else:
        want_q, want_k = seen[names[0]][..., q], seen[names[0]][..., k]  # type: ignore[index]
    assert torch.equal(acts["blocks.1.attn_q"], want_q) and torch.equal(acts["blocks.1.attn_k"], want_k)
    rec_k = acts["blocks.1.attn_k"]
    with model.intervene({"blocks.1.attn_k": lambda x: rec_k.expand_as(x)}):
        assert torch.equal(model(ids), plain)
    with model.intervene({"blocks.1.attn_k": lambda x: x * 3.0}):
        assert not torch.allclose(model(ids), plain)


def test_transcoders_at_the_wrong_hook_or_width_are_refused(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from lmscope.circuits.transcoders import TranscoderSet
    from lmscope.dictionaries.base import DictConfig, build
    from lmscope.dictionaries.formats import save_dictionary

    sae = build(DictConfig(arch="topk", d_in=32, d_sae=16, k=2, hook="blocks.0.resid_post"))
    save_dictionary(sae, tmp_path / "set" / "layer00")
    with pytest.raises(CircuitError, match=r"maps blocks.0.resid_post -> None; a circuit transcoder maps"):
        TranscoderSet.load(tmp_path / "set")
    model, tcs, *_ = built("llama")
    wide = build(DictConfig(arch="topk", d_in=48, d_sae=16, d_out=48, k=2, hook="blocks.0.mlp_in",
                            hook_out="blocks.0.mlp_out"))  # fmt: skip
    other = type(tcs)({**tcs.by_layer, 0: wide})
    with pytest.raises(CircuitError, match=r"width 48 at blocks\.0\.mlp_in, the model 32"):
        other.check(model)
    with pytest.raises(CircuitError, match="not a directory of transcoders"):
        TranscoderSet.load(tmp_path / "missing")


def test_skip_transcoder_learns_a_linear_map_and_round_trips(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A skip-transcoder's W_skip takes the part of the target that is linear in the input; normalisation folds into
    it; it saves and loads; SAELens export is refused with the reason."""
    from lmscope.dictionaries.base import DictConfig, DictionaryError, FormatError
    from lmscope.dictionaries.formats import export_saelens, load_dictionary, save_dictionary
    from lmscope.training import RunSpec, TensorSource, TrainConfig, Trainer

    g = torch.Generator().manual_seed(0)
    x = torch.randn(16384, 16, generator=g) * 3.0
    a = torch.randn(16, 12, generator=g)
    y = x @ a * 0.5 + 2.0  # a linear map: a skip term fits it, a sparse code of k = 2 cannot
    cfgs = [DictConfig(arch="topk", d_in=16, d_sae=32, d_out=12, k=2, hook="h_in", hook_out="h_out", skip=s)
            for s in (True, False)]  # fmt: skip
    runs = [RunSpec(c, name=f"skip{c.skip}", lr=1e-2) for c in cfgs]
    tc = TrainConfig(total_tokens=16384 * 4, warmup_steps=5, log_every=1000)
    out = Trainer(runs, tc, tmp_path / "tc").fit(TensorSource(x, y, batch_size=1024, epochs=4))
    from lmscope.dictionaries.metrics import fvu

    with torch.no_grad():
        f_skip, f_plain = float(fvu(y, out["skipTrue"](x)[0])), float(fvu(y, out["skipFalse"](x)[0]))
    assert f_skip < 0.02 and f_plain > 5 * f_skip, (f_skip, f_plain)
    back = load_dictionary(tmp_path / "tc" / "skipTrue")
    assert back.cfg.skip and torch.equal(back.W_skip, out["skipTrue"].W_skip)
    with torch.no_grad():
        torch.testing.assert_close(back(x[:64])[0], out["skipTrue"](x[:64])[0])
    with pytest.raises(FormatError, match="skip-transcoder"):
        export_saelens(back, tmp_path / "sl")
    with pytest.raises(DictionaryError, match="skip=True is for transcoders"):
        DictConfig(arch="topk", d_in=16, d_sae=32, k=2, skip=True)
    save_dictionary(back, tmp_path / "again")
    assert load_dictionary(tmp_path / "again").cfg.skip


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox"])
def test_no_edge_where_no_path_exists(family: str) -> None:
    """The control: a source with no causal path to a target gets no edge. Features and errors never reach a
    feature of their own or an earlier layer, and nothing reaches a target at an earlier position (causal
    attention), while the same graph does hold edges where paths exist."""
    _model, _tcs, _ids, graph, _rec, _rep = built(family)
    a = graph.adjacency.tocoo()
    checked = 0
    for t, s in zip(a.row.tolist(), a.col.tolist(), strict=True):
        dt, ds = graph.describe(t), graph.describe(s)
        if dt["kind"] != "feature":
            continue
        checked += 1
        if ds["kind"] in ("feature", "error"):
            assert ds["layer"] < dt["layer"], (ds, dt)
        assert ds["pos"] <= dt["pos"], (ds, dt)
    assert checked > 50
