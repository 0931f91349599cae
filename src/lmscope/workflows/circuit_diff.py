"""Circuit diff: the attribution graph of one prompt in BASE and in OTHER, through the same transcoders, compared
node by node and edge by edge: which features strengthen, weaken, appear or vanish on the way to the target
("is this circuit weak and getting stronger?", measured).

Both graphs explain the same target token (by default OTHER's top next token: the behaviour to explain). Nodes are
matched by identity (feature: layer, position, feature id; error: layer, position; token: position). A node's
weight is its influence on the target (circuit-tracer's: the target weights pushed back through the normalised
|adjacency|); an edge's is its direct attribution. The transcoders are BASE's: OTHER's graph shows OTHER's
computation through BASE's vocabulary of features, and its error nodes hold what that vocabulary misses (their
influence is reported: a fine-tune that adds features the transcoders lack shows as growing error influence).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmscope.circuits import AttributionConfig, TranscoderSet, attribute
from lmscope.circuits.graph import Graph, node_influence, scores
from lmscope.core.atomic import atomic_write_json
from lmscope.errors import DiffError
from lmscope.model.adapter import Model

Key = tuple[Any, ...]


def _key(g: Graph, n: int) -> Key:
    d = g.describe(n)
    if d["kind"] == "feature":
        return ("feature", d["layer"], d["pos"], d["feature"])
    if d["kind"] == "error":
        return ("error", d["layer"], d["pos"])
    if d["kind"] == "token":
        return ("token", d["pos"])
    return ("target", d.get("label"))


def _label(k: Key, g: Graph) -> str:
    if k[0] == "feature":
        return f"L{k[1]} F{k[3]} @ {g.token_strs[k[2]]!r}"
    if k[0] == "error":
        return f"error L{k[1]} @ {g.token_strs[k[2]]!r}"
    if k[0] == "token":
        return f"token {g.token_strs[k[1]]!r}"
    return f"target {k[1]!r}"


def _top_token(model: Model, ids: Any) -> str:
    with torch.no_grad():
        logits = model.hf(input_ids=ids[None].to(model.device)).logits[0, -1]
    return str(model.tokenizer.decode([int(logits.argmax())]))


def circuit_diff(
    base: Model, other: Model, tcs: TranscoderSet, prompt: str | torch.Tensor, target: str | None = None,
    cfg: AttributionConfig | None = None, top: int = 15, appear: float = 1e-3,
) -> dict[str, Any]:  # fmt: skip
    """Both graphs and their comparison. `appear`: the influence under which a node counts as absent."""
    ids = prompt if isinstance(prompt, torch.Tensor) else other.encode(prompt, add_special_tokens=False)[0]
    if target is None and other.tokenizer is not None:
        target = _top_token(other, ids)
    targets = [target] if target is not None else []  # no tokenizer: each graph explains its own top logits
    tcs.check(base)  # BASE's transcoders; OTHER is read through them on purpose
    sets = {"base": tcs, "other": tcs.applied_to(other.spec)}
    graphs = {
        name: attribute(m, sets[name], ids, cfg, targets=targets) for name, m in (("base", base), ("other", other))
    }
    infl = {name: node_influence(g) for name, g in graphs.items()}
    nodes: dict[Key, dict[str, float]] = {}
    for name, g in graphs.items():
        for n in range(g.target_start):
            nodes.setdefault(_key(g, n), {"base": 0.0, "other": 0.0})[name] = float(infl[name][n])
    gb = graphs["base"]

    def row(k: Key, v: dict[str, float]) -> dict[str, Any]:
        return {"node": _label(k, gb), "kind": k[0], "base": round(v["base"], 5), "other": round(v["other"], 5),
                "change": round(v["other"] - v["base"], 5)}  # fmt: skip

    def pick(cond: Any, key: Any) -> list[dict[str, Any]]:
        hits = [(k, v) for k, v in nodes.items() if cond(v)]
        return [row(k, v) for k, v in sorted(hits, key=key)[:top]]

    edges: dict[tuple[Key, Key], dict[str, float]] = {}
    for g in graphs.values():
        a = g.adjacency.tocoo()
        strongest = np.argsort(-np.abs(a.data))[: 20 * top]  # the strongest direct effects of each graph
        for i in strongest:
            dst, src = int(a.row[i]), int(a.col[i])
            edges.setdefault((_key(g, src), _key(g, dst)), {"base": 0.0, "other": 0.0})
    # the values of every collected edge in both graphs
    for name, g in graphs.items():
        index = {_key(g, n): n for n in range(g.n_nodes)}
        adj = g.adjacency.tocsr()
        for (ks, kd), v in edges.items():
            s, d = index.get(ks), index.get(kd)
            v[name] = float(adj[d, s]) if s is not None and d is not None else 0.0
    edge_rows = sorted(edges.items(), key=lambda kv: -abs(kv[1]["other"] - kv[1]["base"]))[:top]
    err = {name: float(infl[name][g.error_start : g.token_start].sum()) for name, g in graphs.items()}
    return {
        "prompt": prompt if isinstance(prompt, str) else gb.token_strs,
        "target": target,
        "scores": {name: scores(g) for name, g in graphs.items()},
        "error_influence": err,
        "strengthened": pick(
            lambda v: v["base"] >= appear and v["other"] > v["base"], lambda kv: kv[1]["base"] - kv[1]["other"]
        ),
        "weakened": pick(
            lambda v: v["other"] >= appear and v["base"] > v["other"], lambda kv: kv[1]["other"] - kv[1]["base"]
        ),
        "appeared": pick(lambda v: v["base"] < appear <= v["other"], lambda kv: -kv[1]["other"]),
        "vanished": pick(lambda v: v["other"] < appear <= v["base"], lambda kv: -kv[1]["base"]),
        "edges": [
            {
                "source": _label(ks, gb),
                "target": _label(kd, gb),
                "base": round(v["base"], 5),
                "other": round(v["other"], 5),
            }
            for (ks, kd), v in edge_rows
        ],
        "nodes": {name: g.n_nodes for name, g in graphs.items()},
    }


def add_to_report(directory: Path, result: dict[str, Any]) -> dict[str, Any]:
    """Put a circuit diff into a diff directory's report (report.json and report.html, rewritten atomically)."""
    from lmscope.diff.html import write_html

    path = directory / "report.json"
    if not path.is_file():
        raise DiffError(f"no diff report at {path}; run `lmscope diff BASE OTHER --out {directory}` first")
    report = json.loads(path.read_text())
    report["circuit"] = result
    atomic_write_json(path, report)
    write_html(report, directory / "report.html")
    return report
