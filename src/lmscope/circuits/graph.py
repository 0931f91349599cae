"""An attribution graph: nodes in one fixed order, edges in a sparse matrix, and pure functions over it.

Node order (the index of every node, fixed once the graph is built):

    [features (sorted by layer, position, feature) | errors (layer-major, then position) | tokens | targets]

`adjacency` is a scipy CSR matrix [n_nodes, n_nodes]: row = target node, column = source node, value = the
source's direct effect on the target (its activation times the target's gradient along its decoder direction).
Only feature and target rows have entries. Memory is linear in the number of edges kept, never n_nodes².

The scores follow circuit-tracer's definitions (Ameisen et al. 2025):
- influence: with `A` the adjacency with each row's absolute values normalised to sum 1, and `w` the targets'
  weights (their probabilities), influence = w (A + A² + ...);
- replacement score: the fraction of the tokens' and errors' influence that is the tokens';
- completeness score: the influence-weighted fraction of each node's (normalised) input that does not come from
  error nodes.
Pruning keeps the nodes that make up `node_threshold` of the total influence, then the edges that make up
`edge_threshold` of the edge scores (normalised weight times the target's influence), then drops features and
errors left without outgoing edges and features left without incoming ones, until nothing changes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from safetensors.torch import load_file, save_file

from lmscope.core.atomic import temp_path_for
from lmscope.errors import CircuitError

FORMAT = "lmscope-attribution-graph"
VERSION = 1


@dataclass
class Graph:
    prompt: str
    tokens: np.ndarray  # [n_pos] int64 token ids
    token_strs: list[str]
    n_layers: int
    feat_layer: np.ndarray  # [F] int64
    feat_pos: np.ndarray  # [F] int64
    feat_id: np.ndarray  # [F] int64
    feat_act: np.ndarray  # [F] float32
    targets: list[dict[str, Any]]  # each: token id(s), label, probability, value, weight
    adjacency: sp.csr_matrix
    meta: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ layout
    @property
    def n_pos(self) -> int:
        return len(self.tokens)

    @property
    def n_features(self) -> int:
        return len(self.feat_id)

    @property
    def error_start(self) -> int:
        return self.n_features

    @property
    def token_start(self) -> int:
        return self.n_features + self.n_layers * self.n_pos

    @property
    def target_start(self) -> int:
        return self.token_start + self.n_pos

    @property
    def n_nodes(self) -> int:
        return self.target_start + len(self.targets)

    def target_weights(self) -> np.ndarray:
        w = np.zeros(self.n_nodes)
        w[self.target_start :] = [t["weight"] for t in self.targets]
        return w

    def kind(self, node: int) -> str:
        if node < self.error_start:
            return "feature"
        if node < self.token_start:
            return "error"
        return "token" if node < self.target_start else "target"

    def describe(self, node: int) -> dict[str, Any]:
        """Layer, position and identity of a node."""
        kind = self.kind(node)
        if kind == "feature":
            return {"kind": kind, "layer": int(self.feat_layer[node]), "pos": int(self.feat_pos[node]),
                    "feature": int(self.feat_id[node]), "activation": float(self.feat_act[node])}  # fmt: skip
        if kind == "error":
            layer, pos = divmod(node - self.error_start, self.n_pos)
            return {"kind": kind, "layer": layer, "pos": pos}
        if kind == "token":
            pos = node - self.token_start
            return {"kind": kind, "pos": pos, "token": int(self.tokens[pos]), "text": self.token_strs[pos]}
        return {"kind": kind, **self.targets[node - self.target_start]}

    def feature_node(self, layer: int, pos: int, feature: int) -> int | None:
        hit = np.nonzero((self.feat_layer == layer) & (self.feat_pos == pos) & (self.feat_id == feature))[0]
        return int(hit[0]) if len(hit) else None

    # ------------------------------------------------------------------ files
    def save(self, path: str | Path) -> Path:
        """One safetensors file: the arrays, and everything else as JSON in its metadata. Written atomically."""
        path = Path(path)
        a = self.adjacency.tocsr()
        tensors = {
            "tokens": torch.from_numpy(np.asarray(self.tokens, dtype=np.int64)),
            "feat_layer": torch.from_numpy(np.asarray(self.feat_layer, dtype=np.int64)),
            "feat_pos": torch.from_numpy(np.asarray(self.feat_pos, dtype=np.int64)),
            "feat_id": torch.from_numpy(np.asarray(self.feat_id, dtype=np.int64)),
            "feat_act": torch.from_numpy(np.asarray(self.feat_act, dtype=np.float32)),
            "adj_indptr": torch.from_numpy(a.indptr.astype(np.int64)),
            "adj_indices": torch.from_numpy(a.indices.astype(np.int64)),
            "adj_data": torch.from_numpy(a.data.astype(np.float32)),
        }
        info = {"format": FORMAT, "version": VERSION, "prompt": self.prompt, "token_strs": self.token_strs,
                "n_layers": self.n_layers, "targets": self.targets, "meta": self.meta}  # fmt: skip
        tmp = temp_path_for(path)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"graph": json.dumps(info)})
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Graph:
        path = Path(path)
        if not path.is_file():
            raise CircuitError(f"{path} does not exist; build a graph with `lmscope circuit`")
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                info = json.loads((f.metadata() or {})["graph"])
            t = load_file(str(path))
        except Exception as exc:
            raise CircuitError(
                f"{path} is not an lmscope attribution graph ({exc}); rebuild it with `lmscope circuit`"
            ) from exc
        if info.get("format") != FORMAT or info.get("version") != VERSION:
            raise CircuitError(f"{path} is {info.get('format')} v{info.get('version')}, not {FORMAT} v{VERSION}")
        g = cls(
            prompt=info["prompt"], tokens=t["tokens"].numpy(), token_strs=info["token_strs"], n_layers=info["n_layers"],
            feat_layer=t["feat_layer"].numpy(), feat_pos=t["feat_pos"].numpy(), feat_id=t["feat_id"].numpy(),
            feat_act=t["feat_act"].numpy(), targets=info["targets"], adjacency=sp.csr_matrix((0, 0)), meta=info["meta"],
        )  # fmt: skip
        n = g.n_nodes
        g.adjacency = sp.csr_matrix(
            (t["adj_data"].numpy(), t["adj_indices"].numpy(), t["adj_indptr"].numpy()), shape=(n, n)
        )
        if g.adjacency.indptr[-1] != len(g.adjacency.data):
            raise CircuitError(f"{path}: the adjacency arrays disagree; the file is corrupt")
        return g


# ---------------------------------------------------------------------- pure functions
def normalize(adjacency: sp.csr_matrix) -> sp.csr_matrix:
    """|A| with each row scaled to sum 1 (rows without entries stay empty)."""
    a = abs(adjacency.tocsr()).astype(np.float64)
    sums = np.asarray(a.sum(axis=1)).ravel()
    scale = np.divide(1.0, sums, out=np.zeros_like(sums), where=sums > 1e-10)
    return sp.csr_matrix(sp.diags(scale) @ a)


def influence(a_norm: sp.csr_matrix, weights: np.ndarray, max_iter: int = 10_000) -> np.ndarray:
    """weights (A + A² + ...): how much each node feeds the weighted targets, directly and through others."""
    a_t = a_norm.T.tocsr()
    current = a_t @ weights
    total = current.copy()
    for _ in range(max_iter):
        if not current.any():
            return total
        current = a_t @ current
        total += current
    raise CircuitError(f"influence did not converge in {max_iter} steps: the graph has a cycle")


def node_influence(graph: Graph) -> np.ndarray:
    return influence(normalize(graph.adjacency), graph.target_weights())


def _threshold(scores: np.ndarray, keep: float) -> float:
    """The smallest score among those that, taken from the top, make up `keep` of the total."""
    s = np.sort(scores)[::-1]
    total = s.sum()
    if total <= 0:
        return np.inf
    cum = np.cumsum(s) / total
    i = min(int(np.searchsorted(cum, keep)), len(s) - 1)
    return float(s[i])


@dataclass
class Pruned:
    node_mask: np.ndarray  # [n_nodes] bool
    edges: sp.csr_matrix  # the kept edges (same shape as the adjacency)
    cumulative: np.ndarray  # [n_nodes]: each node's cumulative influence rank (0..1, smaller = more influential)


def prune(graph: Graph, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> Pruned:
    for name, v in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not 0.0 <= v <= 1.0:
            raise CircuitError(f"{name} must be between 0 and 1, got {v}")
    a = graph.adjacency.tocsr()
    weights = graph.target_weights()
    inf = influence(normalize(a), weights)
    keep = inf >= _threshold(inf, node_threshold)
    keep[graph.token_start :] = True  # tokens and targets always stay
    diag = sp.diags(keep.astype(np.float64))
    pruned = sp.csr_matrix(diag @ a @ diag)
    pruned.eliminate_zeros()
    a_norm = normalize(pruned)
    out_inf = influence(a_norm, weights) + weights
    scores = sp.csr_matrix(sp.diags(out_inf) @ a_norm)
    cut = _threshold(scores.data, edge_threshold) if scores.nnz else np.inf
    mask = scores.copy()
    mask.data = (scores.data >= cut).astype(np.float64)
    mask.eliminate_zeros()
    body = slice(0, graph.token_start)
    while True:
        before = keep.copy()
        has_out = np.asarray(mask.sum(axis=0)).ravel() > 0
        has_in = np.asarray(mask.sum(axis=1)).ravel() > 0
        keep[body] &= has_out[body]
        keep[: graph.n_features] &= has_in[: graph.n_features]
        d = sp.diags(keep.astype(np.float64))
        mask = sp.csr_matrix(d @ mask @ d)
        mask.eliminate_zeros()
        if np.array_equal(keep, before):
            break
    edges = pruned.multiply(mask > 0).tocsr()
    order = np.argsort(-inf, kind="stable")
    cum = np.empty_like(inf)
    total = inf.sum()
    cum[order] = np.cumsum(inf[order]) / total if total > 0 else 0.0
    return Pruned(keep, edges, cum)


def scores(graph: Graph, adjacency: sp.csr_matrix | None = None) -> dict[str, float]:
    """Replacement and completeness scores of the graph (or of the same nodes with another edge set)."""
    a_norm = normalize(graph.adjacency if adjacency is None else adjacency)
    weights = graph.target_weights()
    inf = influence(a_norm, weights)
    token_inf = float(inf[graph.token_start : graph.target_start].sum())
    error_inf = float(inf[graph.error_start : graph.token_start].sum())
    replacement = token_inf / (token_inf + error_inf) if token_inf + error_inf > 0 else 0.0
    error_in = np.asarray(a_norm[:, graph.error_start : graph.token_start].sum(axis=1)).ravel()
    out_inf = inf + weights
    completeness = float(((1.0 - error_in) * out_inf).sum() / out_inf.sum()) if out_inf.sum() > 0 else 0.0
    return {"replacement": replacement, "completeness": completeness}
