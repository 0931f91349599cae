"""Check a graph by intervening: set features to values, compare the graph's prediction with three reruns.

For each intervention `LAYER:FEATURE:POS=VALUE` on a feature node of the graph, the graph predicts the change of
every target and downstream feature it has a row for: the sum over interventions of `(VALUE - a) / a` times the
edge (its direct effect). The model is then rerun three ways:
- **constrained**: the frozen replacement model (attention patterns, norm scales and all other features held);
  this is exactly what the graph's edges describe, so prediction = actual up to float error;
- **frozen attention**: attention and norms still frozen, but every downstream MLP is its transcoder applied to its
  new input (the features respond), plus the recorded error;
- **free**: the real model, attention and norms free, with only the intervened MLP output changed by
  `(VALUE - a) * W_dec[feature]` at that position.
The gaps between the three say how far the linear, frozen picture carries.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lmscope.circuits.graph import Graph
from lmscope.circuits.replacement import Replacement, record
from lmscope.circuits.transcoders import TranscoderSet
from lmscope.errors import CircuitError
from lmscope.model.adapter import Model

_SPEC = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*:\s*(\d+)\s*=\s*(\S+)\s*$")


@dataclass(frozen=True)
class Intervention:
    layer: int
    feature: int
    pos: int
    value: float


def parse_intervention(text: str) -> Intervention:
    m = _SPEC.match(text)
    if m is None:
        raise CircuitError(f"cannot read intervention {text!r}; write LAYER:FEATURE:POS=VALUE, e.g. 3:1207:5=0")
    try:
        value = float(m.group(4))
    except ValueError:
        raise CircuitError(f"intervention {text!r}: {m.group(4)!r} is not a number") from None
    if not torch.isfinite(torch.tensor(value)):
        raise CircuitError(f"intervention {text!r}: the value must be a finite number")
    return Intervention(int(m.group(1)), int(m.group(2)), int(m.group(3)), value)


def _target_values(graph: Graph, logits: Tensor) -> list[float]:
    last = logits[0, -1].double()
    c = last - last.mean()
    return [float(c[t["tokens"]].sum() - (c[t["minus"]].sum() if t["minus"] else 0)) for t in graph.targets]


def _feature_values(graph: Graph, tcs: TranscoderSet, nodes: list[int], mlp_in: dict[int, Tensor]) -> list[float]:
    out = []
    for n in nodes:
        d = graph.describe(n)
        t = tcs[d["layer"]]
        x = mlp_in[d["layer"]][0, d["pos"]].detach().double()
        out.append(float(x @ t.W_enc[:, d["feature"]].detach().double() + t.b_enc[d["feature"]].detach().double()))
    return out


@torch.no_grad()
def check_interventions(
    model: Model, tcs: TranscoderSet, graph: Graph, interventions: list[Intervention], n_features: int = 10
) -> dict[str, Any]:
    """The graph's predicted changes beside the actual ones (constrained, frozen attention, free); see the module."""
    if not interventions:
        raise CircuitError("no intervention given; write LAYER:FEATURE:POS=VALUE")
    ids = torch.as_tensor(graph.tokens)
    rec = record(model, tcs, ids)
    rep = Replacement(model, tcs, rec)
    nodes, scale = [], []
    for iv in interventions:
        node = graph.feature_node(iv.layer, iv.pos, iv.feature)
        if node is None:
            raise CircuitError(
                f"feature {iv.feature} at layer {iv.layer}, position {iv.pos} is not a node of this graph (inactive "
                "there, or not visited); intervene on a feature the graph shows"
            )
        a = float(graph.feat_act[node])
        nodes.append(node)
        scale.append((iv.value - a) / a)
    adj = graph.adjacency.tocsc()
    downstream = sorted(
        {int(r) for n in nodes for r in adj[:, n].nonzero()[0] if graph.kind(int(r)) == "feature"} - set(nodes)
    )

    def predicted(target: int) -> float:
        row = graph.adjacency[target]
        return sum(s * float(row[0, n]) for n, s in zip(nodes, scale, strict=True))

    pred_feat = {n: predicted(n) for n in downstream}
    top = sorted(downstream, key=lambda n: -abs(pred_feat[n]))[:n_features]
    targets = list(range(graph.target_start, graph.n_nodes))

    # constrained: the intervened MLP outputs move by (value - a) * W_dec; every other feature is held
    moves: dict[int, list[tuple[int, Tensor]]] = {}
    for iv, node in zip(interventions, nodes, strict=True):
        delta = (iv.value - float(graph.feat_act[node])) * tcs[iv.layer].W_dec[iv.feature].detach()
        moves.setdefault(iv.layer, []).append((iv.pos, delta))

    def moved(i: int, _x: Tensor) -> Tensor:
        out = rec.mlp_out[i].unsqueeze(0).clone()
        for p, v in moves.get(i, []):
            out[0, p] += v.to(out.dtype)
        return out

    base_logits, base_in = rep.run()
    con_logits, con_in = rep.run(mlp_out=moved)
    edits = {(iv.layer, iv.pos, iv.feature): iv.value for iv in interventions}
    fro_logits, fro_in = rep.run(mlp_out=rep.recomputed_mlp_out(edits))
    fro_base_logits, fro_base_in = rep.run(mlp_out=rep.recomputed_mlp_out({}))
    free_logits, free_base = _free(model, rec.ids, moves)

    def change(after: list[float], before: list[float]) -> list[float]:
        return [a - b for a, b in zip(after, before, strict=True)]

    t_base = _target_values(graph, base_logits)
    f_base = _feature_values(graph, tcs, top, base_in)
    report_targets = [
        {
            "label": graph.targets[i - graph.target_start]["label"],
            "predicted": predicted(i),
            "constrained": c,
            "frozen_attention": f,
            "free": fr,
        }
        for i, c, f, fr in zip(
            targets,
            change(_target_values(graph, con_logits), t_base),
            change(_target_values(graph, fro_logits), _target_values(graph, fro_base_logits)),
            change(_target_values(graph, free_logits), _target_values(graph, free_base)),
            strict=True,
        )
    ]
    report_features = [
        {**graph.describe(n), "predicted": pred_feat[n], "constrained": c, "frozen_attention": f}
        for n, c, f in zip(
            top,
            change(_feature_values(graph, tcs, top, con_in), f_base),
            change(_feature_values(graph, tcs, top, fro_in), _feature_values(graph, tcs, top, fro_base_in)),
            strict=True,
        )
    ]
    probs_before = torch.softmax(free_base[0, -1].double(), -1)
    probs_after = torch.softmax(free_logits[0, -1].double(), -1)
    top_after = probs_after.topk(5)
    tok = model.tokenizer
    return {
        "interventions": [
            vars(iv) | {"activation": float(graph.feat_act[n])} for iv, n in zip(interventions, nodes, strict=True)
        ],
        "targets": report_targets,
        "features": report_features,
        "free_top_tokens": [
            {
                "token": tok.decode([int(i)]) if tok is not None else str(int(i)),
                "p": float(p),
                "p_before": float(probs_before[int(i)]),
            }
            for p, i in zip(top_after.values, top_after.indices, strict=True)
        ],
    }


def _free(model: Model, ids: Tensor, moves: dict[int, list[tuple[int, Tensor]]]) -> tuple[Tensor, Tensor]:
    """(logits after, logits before) of the real model with the MLP outputs moved; attention and norms free."""

    def writer(layer: int) -> Callable[[Tensor], Tensor]:
        def write(x: Tensor) -> Tensor:
            out = x.clone()
            for p, v in moves[layer]:
                out[0, p] += v.to(out.dtype)
            return out

        return write

    with model.capture(["logits"], stop_early=False) as acts:
        model(ids.unsqueeze(0))
    before = acts["logits"]
    with (
        model.capture(["logits"], stop_early=False) as acts,
        model.intervene({f"blocks.{i}.mlp_out": writer(i) for i in moves}),
    ):
        model(ids.unsqueeze(0))
    return acts["logits"], before
