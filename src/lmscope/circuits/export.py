"""The graph as Neuronpedia's attribution-graph viewer reads it: metadata, qParams, nodes, links.

Node ids follow the viewer's conventions (as circuit-tracer writes them):
- feature `{layer}_{feature}_{pos}`, feature_type "cross layer transcoder" (the viewer's name for transcoder
  features; lmscope's are per-layer);
- error `err_{layer}_{pos}`, feature_type "mlp reconstruction error" (circuit-tracer writes `0_{layer}_{pos}`,
  which is also the id of layer 0's feature number `layer` at that position; lmscope keeps ids unique);
- token `E_{token id}_{pos}`, layer "E", feature_type "embedding";
- target logit `{n_layers + 1}_{token id}_{pos}`, feature_type "logit".
Links are `{source, target, weight}`. A feature node's `feature` is its layer's own feature id, and the graph names one
scan per layer the way circuit-tracer does for a list of per-layer transcoders: `metadata.scan` starts with "custom-"
and `metadata.transcoder_list[layer]` is that layer's scan, so the viewer fetches a node's feature from
`features/{transcoder_list[layer]}/{feature}.json`, the file `lmscope export LAYER_ATLAS --static OUT` writes
(lmscope.atlas.neuronpedia: the names, and the rule). lmscope's own figures (scores, settings, timing) sit under
`metadata.lmscope`, which the viewer ignores. `qParams.supernodes` holds hand-made groups as
`[label, node_id, ...]`, the viewer's form.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lmscope.atlas.db.schema import AtlasError
from lmscope.atlas.neuronpedia import check_scan, graph_scan, transcoder_scans
from lmscope.circuits.graph import Graph, prune, scores
from lmscope.core.atomic import atomic_write_json
from lmscope.errors import CircuitError

Labeler = Callable[[int, int], str]  # (layer, feature) -> label ("" when none)


def node_id(graph: Graph, node: int) -> str:
    d = graph.describe(node)
    if d["kind"] == "feature":
        return f"{d['layer']}_{d['feature']}_{d['pos']}"
    if d["kind"] == "error":
        return f"err_{d['layer']}_{d['pos']}"
    if d["kind"] == "token":
        return f"E_{d['token']}_{d['pos']}"
    return f"{graph.n_layers + 1}_{d['tokens'][0]}_{graph.n_pos - 1}"


def to_neuronpedia(
    graph: Graph,
    slug: str,
    node_threshold: float = 0.8,
    edge_threshold: float = 0.98,
    labeler: Labeler | None = None,
    scans: Sequence[str] | None = None,
) -> dict[str, Any]:
    """The pruned graph in the viewer's JSON schema, with both graphs' scores under metadata.lmscope. `scans`: the
    scan of each layer's features (metadata.transcoder_list, by layer); by default the per-layer atlases' default
    scans (`transcoder_scans`), the folders `lmscope export` writes their features into."""
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,100}", slug):
        raise CircuitError(f"slug {slug!r}: use 1-100 letters, digits, '.', '_' or '-'")
    model = str(graph.meta.get("model", "model"))
    layer_scans = transcoder_scans(model, graph.n_layers) if scans is None else list(scans)
    if len(layer_scans) != graph.n_layers:
        raise CircuitError(f"scans: {len(layer_scans)} given for a graph of {graph.n_layers} layers; give one a layer")
    try:
        for s in layer_scans:
            check_scan(s)
    except AtlasError as exc:
        raise CircuitError(str(exc)) from None
    pr = prune(graph, node_threshold, edge_threshold)
    full = scores(graph)
    kept = scores(graph, pr.edges)
    inf = pr.cumulative
    nodes: list[dict[str, Any]] = []
    ids: dict[int, str] = {}
    for node in np.nonzero(pr.node_mask)[0].tolist():
        d = graph.describe(node)
        nid = node_id(graph, node)
        ids[node] = nid
        base = {
            "node_id": nid, "jsNodeId": nid, "ctx_idx": int(d.get("pos", graph.n_pos - 1)),
            "influence": float(inf[node]), "token_prob": 0.0, "is_target_logit": False, "run_idx": 0,
            "reverse_ctx_idx": 0, "clerp": "",
        }  # fmt: skip
        if d["kind"] == "feature":
            label = labeler(d["layer"], d["feature"]) if labeler else ""
            base.update(feature=d["feature"], layer=str(d["layer"]), feature_type="cross layer transcoder",
                        activation=d["activation"], clerp=label)  # fmt: skip
        elif d["kind"] == "error":
            base.update(feature=-1, layer=str(d["layer"]), feature_type="mlp reconstruction error", activation=None)
        elif d["kind"] == "token":
            base.update(feature=d["pos"], layer="E", feature_type="embedding", activation=None, clerp=d["text"])
        else:
            base.update(feature=d["tokens"][0], layer=str(graph.n_layers + 1), feature_type="logit", activation=None,
                        token_prob=d["probability"], is_target_logit=node == graph.target_start,
                        clerp=f"Output {d['label']!r} (p={d['probability']:.3f})")  # fmt: skip
        nodes.append(base)
    e = pr.edges.tocoo()
    links = [
        {"source": ids[int(s)], "target": ids[int(t)], "weight": float(w)}
        for t, s, w in zip(e.row, e.col, e.data, strict=True)
        if int(s) in ids and int(t) in ids
    ]
    meta = {
        "slug": slug,
        "scan": graph_scan(model),
        "transcoder_list": layer_scans,
        "prompt_tokens": graph.token_strs,
        "prompt": graph.prompt,
        "node_threshold": node_threshold,
        "lmscope": {
            "edge_threshold": edge_threshold,
            "scores": {"unpruned": full, "pruned": kept},
            "n_nodes": {"unpruned": graph.n_nodes, "pruned": int(pr.node_mask.sum())},
            "n_edges": {"unpruned": int(graph.adjacency.nnz), "pruned": len(links)},
            "targets": graph.targets,
            **{k: v for k, v in graph.meta.items() if k not in ("targets",)},
        },
    }
    q = {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""}
    return {"metadata": meta, "qParams": q, "nodes": nodes, "links": links}


def write_neuronpedia(doc: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    atomic_write_json(path, doc, indent=None)
    return path


def read_neuronpedia(path: str | Path) -> dict[str, Any]:
    """A graph JSON, checked for the fields the viewer (and lmscope's graph view) needs."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CircuitError(f"{path} is not a readable graph JSON ({exc}); rebuild it with `lmscope circuit`") from exc
    for key in ("metadata", "qParams", "nodes", "links"):
        if key not in doc:
            raise CircuitError(f"{path} has no {key!r}: it is not an attribution-graph JSON")
    return doc


def set_supernodes(path: str | Path, supernodes: list[list[str]]) -> dict[str, Any]:
    """Save hand-made supernodes ([label, node_id, ...] each) into the graph file, atomically."""
    doc = read_neuronpedia(path)
    known = {n["node_id"] for n in doc["nodes"]}
    for group in supernodes:
        if not isinstance(group, list) or len(group) < 2 or not all(isinstance(x, str) for x in group):
            raise CircuitError("a supernode is [label, node_id, node_id, ...] with at least one node")
        if not group[0].strip():
            raise CircuitError("a supernode needs a non-empty label")
        unknown = [x for x in group[1:] if x not in known]
        if unknown:
            raise CircuitError(f"supernode {group[0]!r} names nodes not in this graph: {unknown[:5]}")
    doc["qParams"]["supernodes"] = supernodes
    write_neuronpedia(doc, path)
    return doc


def atlas_labeler(directory: str | Path) -> Labeler:
    """Labels of transcoder features from a directory of per-layer atlases (`lmscope atlas --dict TC/`): the label
    the explorer shows (human first, else the best-scored machine label); "" where a layer has no atlas."""
    from lmscope.atlas.store import AtlasStore
    from lmscope.circuits.transcoders import atlas_name

    d = Path(directory)
    if not d.is_dir():
        raise CircuitError(
            f"--atlas {d} is not a directory of per-layer atlases (make one with `lmscope atlas --dict TC/`)"
        )
    stores: dict[int, AtlasStore | None] = {}

    def label(layer: int, feature: int) -> str:
        if layer not in stores:
            path = d / atlas_name(layer)
            stores[layer] = AtlasStore(path) if path.is_file() else None
        store = stores[layer]
        if store is None:
            return ""
        return str(store.labels([feature]).get(feature, {}).get("text", ""))

    return label
