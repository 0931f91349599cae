"""Build the attribution graph of a prompt: targets, batched backward passes, sparse rows, influence-first order.

1. Record the real forward pass (`replacement.record`) and pick the targets: by default the top logits of the
   last position up to 0.95 cumulative probability (at most 10), each demeaned over the vocabulary; or given
   tokens; or one logit difference.
2. Run the replacement model once with gradients, on `batch` copies of the prompt, with the block-0 input and
   every MLP output as leaf tensors; the graph is kept for every backward pass.
3. Rows: each target's gradient with respect to those leaves, for a batch of targets per backward pass (the
   forward pass ran on `batch` copies of the prompt, and row b is copy b's gradient), turned into direct
   effects: a feature's is its activation times the gradient along its decoder row, an error's and a token's
   the gradient dotted with the error or embedding vector.
4. Logit rows first; then feature rows, most influential first, re-ranked as rows arrive, up to
   `max_feature_nodes` (circuit-tracer's order). A row keeps every error and token edge and at most
   `max_edges_per_row` feature edges, the largest by absolute value; what it drops is recorded (`meta.dropped`:
   a fraction of the row's absolute weight, counting edges from features that are never visited, which the graph
   leaves out anyway), and `benchmarks/circuit.py` compares capped graphs with exact ones.
5. Features never visited are left out of the graph, as circuit-tracer does.

Memory: one forward graph, a batch of dense gradients at a time, and the kept edges.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor

from lmscope.circuits.graph import Graph, influence, normalize
from lmscope.circuits.replacement import Recording, Replacement, record
from lmscope.circuits.row_exchange import Piece, exchange
from lmscope.circuits.transcoders import TranscoderSet
from lmscope.core.distributed import rank as dist_rank
from lmscope.core.distributed import world_size as dist_world
from lmscope.core.progress import ProgressCallback, ProgressEvent, emit, resolve
from lmscope.errors import CircuitError
from lmscope.model.adapter import Model

MAX_PROMPT_TOKENS = 4096


@dataclass
class AttributionConfig:
    max_feature_nodes: int | None = 4096  # None: every active feature gets a row
    max_edges_per_row: int | None = 16_384  # None: keep every non-zero edge (exact)
    batch_size: int | None = None  # rows per backward pass; None: as many as `batch_memory_mb` allows
    batch_memory_mb: float = 2048.0
    max_n_logits: int = 10
    desired_logit_prob: float = 0.95
    update_every: int = 4  # batches between re-rankings of the unvisited features
    max_prompt_tokens: int = MAX_PROMPT_TOKENS


@dataclass
class Target:
    label: str
    plus: list[int]  # token ids whose demeaned logits are added
    minus: list[int]  # token ids subtracted (a logit difference)
    probability: float
    weight: float


def _decode(model: Model, tok: int) -> str:
    return model.tokenizer.decode([tok]) if model.tokenizer is not None else str(tok)


def single_token(model: Model, text: str) -> int:
    """The one token id of `text`, or a CircuitError that shows how it splits."""
    if model.tokenizer is None:
        raise CircuitError("this model has no tokenizer; give target token ids instead of text")
    ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        parts = [model.tokenizer.decode([i]) for i in ids]
        raise CircuitError(
            f"target {text!r} is {len(ids)} tokens ({parts}), not one; a target must be a single token, e.g. "
            f"{parts[0]!r}"
            if parts
            else f"target {text!r} is empty"
        )
    return int(ids[0])


def pick_targets(
    model: Model, logits: Tensor, cfg: AttributionConfig, tokens: Sequence[str] = (), minus: str | None = None
) -> list[Target]:
    probs = torch.softmax(logits.double(), -1)
    if minus is not None:
        if len(tokens) != 1:
            raise CircuitError("a logit difference takes exactly one --target and one --minus token")
        a, b = single_token(model, tokens[0]), single_token(model, minus)
        label = f"{_decode(model, a)!r} - {_decode(model, b)!r}"
        return [Target(label, [a], [b], float(probs[a] - probs[b]), 1.0)]
    if tokens:
        ids = [single_token(model, t) for t in tokens]
        p = [float(probs[i]) for i in ids]
        total = sum(p)
        return [
            Target(_decode(model, i), [i], [], pi, pi / total if total > 0 else 1 / len(ids))
            for i, pi in zip(ids, p, strict=True)
        ]
    top_p, top_i = probs.topk(min(cfg.max_n_logits, probs.numel()))
    cut = int(torch.searchsorted(torch.cumsum(top_p, 0), torch.tensor(cfg.desired_logit_prob, dtype=top_p.dtype))) + 1
    top_p, top_i = top_p[:cut], top_i[:cut]
    return [Target(_decode(model, int(i)), [int(i)], [], float(p), float(p)) for p, i in zip(top_p, top_i, strict=True)]


def _target_values(logits_last: Tensor, targets: list[Target]) -> Tensor:
    """[copies, targets]: each target's demeaned logit (or logit difference), from lm_head's raw output at the
    last position [copies, vocab]."""
    centred = logits_last - logits_last.mean(-1, keepdim=True)
    vals = [centred[:, t.plus].sum(-1) - (centred[:, t.minus].sum(-1) if t.minus else 0) for t in targets]
    return torch.stack(vals, -1)


class _Rows:
    """The candidate columns of one recording, and the conversion of gradients into rows of direct effects."""

    def __init__(self, rec: Recording, tcs: TranscoderSet) -> None:
        self.rec, self.tcs = rec, tcs
        self.L, self.n = len(rec.acts), rec.n_pos
        self.pos: list[Tensor] = []
        self.slot: list[Tensor] = []
        self.offset: list[int] = [0]
        for layer in range(self.L):
            p, s = (rec.acts[layer].val != 0).nonzero(as_tuple=True)
            self.pos.append(p)
            self.slot.append(s)
            self.offset.append(self.offset[-1] + len(p))
        self.F = self.offset[-1]
        self.error_start, self.token_start = self.F, self.F + self.L * self.n
        self.n_cols = self.token_start + self.n
        self.layer_of = np.repeat(np.arange(self.L), np.diff(self.offset))

    def feature(self, j: int) -> tuple[int, int, int, float]:
        layer = int(self.layer_of[j])
        i = j - self.offset[layer]
        a = self.rec.acts[layer]
        p, s = int(self.pos[layer][i]), int(self.slot[layer][i])
        return layer, p, int(a.idx[p, s]), float(a.val[p, s])

    def rows(self, g_embed: Tensor, g_mlp: dict[int, Tensor]) -> Tensor:
        """[B, n_cols] direct effects from gradients at the block-0 input [B, n, d] and each MLP output."""
        B = g_embed.shape[0]
        out = torch.zeros(B, self.n_cols)
        for layer, g in g_mlp.items():
            a = self.rec.acts[layer]
            w = self.tcs[layer].W_dec.detach()
            dots = torch.einsum("bnd,nkd->bnk", g.float(), w[a.idx])  # gradient along each active decoder row
            vals = dots[:, self.pos[layer], self.slot[layer]] * a.val[self.pos[layer], self.slot[layer]]
            out[:, self.offset[layer] : self.offset[layer + 1]] = vals
            e0 = self.error_start + layer * self.n
            out[:, e0 : e0 + self.n] = (g.float() * self.rec.error[layer].float()).sum(-1)
        out[:, self.token_start :] = (g_embed.float() * self.rec.embed.float()).sum(-1)
        return out


def attribute(
    model: Model,
    tcs: TranscoderSet,
    prompt: str | Tensor,
    cfg: AttributionConfig | None = None,
    targets: Sequence[str] = (),
    minus: str | None = None,
    progress: ProgressCallback | bool | None = None,
) -> Graph:
    """The attribution graph of `prompt` through the transcoders (see the module docstring)."""
    cfg = cfg or AttributionConfig()
    report = resolve(progress)
    t0 = time.perf_counter()
    ids = model.encode(prompt)[0] if isinstance(prompt, str) else torch.as_tensor(prompt).reshape(-1)
    if ids.numel() < 1:
        raise CircuitError("the prompt is empty")
    if ids.numel() > cfg.max_prompt_tokens:
        raise CircuitError(
            f"the prompt is {ids.numel()} tokens; attribution graphs take at most {cfg.max_prompt_tokens} "
            "(AttributionConfig.max_prompt_tokens / --max-tokens); shorten it"
        )
    rec = record(model, tcs, ids)
    tlist = pick_targets(model, rec.logits[-1], cfg, targets, minus)
    cols = _Rows(rec, tcs)
    rep = Replacement(model, tcs, rec)

    d = model.d_model
    per_row = cols.L * cols.n * d * 4 * 16 + cols.n_cols * 8  # one copy's forward graph and gradients, and its row
    batch = cfg.batch_size or max(1, min(256, int(cfg.batch_memory_mb * 1e6 // per_row)))
    # One forward pass of `batch` copies of the prompt, with the block-0 input and every MLP output as leaves;
    # each backward pass then gives `batch` rows at once: row b is copy b's gradient.
    embed = rec.embed.unsqueeze(0).repeat(batch, 1, 1).requires_grad_(True)
    leaves = {i: rec.mlp_out[i].unsqueeze(0).repeat(batch, 1, 1).requires_grad_(True) for i in range(cols.L)}
    logits, mlp_in = rep.run(embed, lambda i, _x: leaves[i], grad=True, copies=batch)
    tvals = _target_values(logits[:, -1], tlist)  # [batch, targets]

    def grads(rows: list[tuple[str, int]]) -> Tensor:
        """Rows of direct effects for targets ("target", i) or ("feature", j); at most `batch` of them."""
        outputs: list[Tensor] = []
        gouts: list[Tensor] = []
        max_layer = cols.L
        if any(k == "target" for k, _ in rows):
            go = torch.zeros(batch, len(tlist), dtype=tvals.dtype)
            for b, (k, i) in enumerate(rows):
                if k == "target":
                    go[b, i] = 1.0
            outputs.append(tvals)
            gouts.append(go)
        feats = [(b, cols.feature(j)) for b, (k, j) in enumerate(rows) if k == "feature"]
        if feats and len(feats) == len(rows):
            max_layer = max(f[1][0] for f in feats)
        for layer in sorted({f[0] for _, f in feats}):
            go = torch.zeros_like(mlp_in[layer])
            w_enc = tcs[layer].W_enc.detach()
            for b, (lay, p, f, _a) in feats:
                if lay == layer:
                    go[b, p] = w_enc[:, f].to(go.dtype)
            outputs.append(mlp_in[layer])
            gouts.append(go)
        inputs = [embed] + [leaves[i] for i in range(max_layer)]
        got = torch.autograd.grad(outputs, inputs, gouts, retain_graph=True, allow_unused=True)
        B = len(rows)
        g_embed = got[0][:B] if got[0] is not None else torch.zeros(B, *embed.shape[1:])
        g_mlp = {i: got[1 + i][:B] for i in range(max_layer) if got[1 + i] is not None}
        return cols.rows(g_embed, g_mlp)

    # node indices in the candidate layout: features | errors | tokens | targets
    n_all = cols.n_cols + len(tlist)
    r_idx: list[np.ndarray] = []
    c_idx: list[np.ndarray] = []
    vals: list[np.ndarray] = []
    dropped: dict[int, dict[str, float]] = {}
    row_nodes: list[int] = []

    total_rows = len(tlist) + min(cols.F, cfg.max_feature_nodes if cfg.max_feature_nodes is not None else cols.F)
    done = 0

    def tick(finished: bool = False) -> None:
        if report is not None:
            emit(report, ProgressEvent(task="attribution rows", done=done, total=total_rows, unit="rows",
                                       finished=finished))  # fmt: skip

    def edges(node: int, row: Tensor) -> Piece:
        """A row's kept edges: its error and token edges (at most layers x positions + positions) and its largest
        `max_edges_per_row` feature edges, with what the cap drops (abs fraction, sum, count)."""
        row = row.cpu()
        nz = torch.nonzero(row).squeeze(1)
        v = row[nz]
        is_feat = nz < cols.F
        n_feat = int(is_feat.sum())
        drop = None
        if cfg.max_edges_per_row is not None and n_feat > cfg.max_edges_per_row:
            fv = v[is_feat]
            top = torch.topk(fv.abs(), cfg.max_edges_per_row).indices
            gone = torch.ones(n_feat, dtype=torch.bool)
            gone[top] = False
            drop = (float(fv[gone].abs().sum() / v.abs().sum()), float(fv[gone].sum()), int(gone.sum()))
            keep_mask = ~is_feat
            keep_mask[torch.nonzero(is_feat).squeeze(1)[top]] = True
            nz, v = nz[keep_mask], v[keep_mask]
        return node, nz, v, drop

    def keep(piece: Piece) -> None:
        node, nz, v, drop = piece
        if drop is not None:
            dropped[node] = {"abs_frac": drop[0], "sum": drop[1], "n": drop[2]}
        r_idx.append(np.full(len(nz), node, dtype=np.int64))
        c_idx.append(nz.numpy().astype(np.int64))
        vals.append(v.numpy().astype(np.float32))
        row_nodes.append(node)

    R, W = dist_rank(), dist_world()

    def run_batches(batches: list[tuple[list[tuple[str, int]], list[int]]]) -> None:
        """Compute the rows of each batch (row specs, their nodes) and keep them in batch order; under torchrun
        batch c is computed by rank c mod N and every rank receives every row (row_exchange.py)."""
        nonlocal done
        mine: dict[int, list[Piece]] = {}
        for c, (spec, nodes) in enumerate(batches):
            if c % W == R:
                mine[c] = [edges(node, row) for node, row in zip(nodes, grads(spec), strict=True)]
                if W == 1:
                    for piece in mine.pop(c):
                        keep(piece)
                    done += len(nodes)
                    tick()
        if W > 1:
            every = exchange(mine, R, W, torch.device("cuda", torch.cuda.current_device())
                             if torch.distributed.get_backend() == "nccl" else torch.device("cpu"))  # fmt: skip
            for c in range(len(batches)):
                for piece in every[c]:
                    keep(piece)
                done += len(batches[c][1])
            tick()

    tick()
    run_batches([([("target", i) for i in range(s, min(s + batch, len(tlist)))],
                  [cols.n_cols + i for i in range(s, min(s + batch, len(tlist)))])
                 for s in range(0, len(tlist), batch)])  # fmt: skip
    weights = np.zeros(n_all)
    weights[cols.n_cols :] = [t.weight for t in tlist]
    visited = np.zeros(cols.F, dtype=bool)
    budget = cols.F if cfg.max_feature_nodes is None else min(cols.F, cfg.max_feature_nodes)
    n_visited = 0
    while n_visited < budget:
        if budget == cols.F:
            pending = np.arange(cols.F)[~visited]
        else:
            a = sp.csr_matrix(
                (np.concatenate(vals), (np.concatenate(r_idx), np.concatenate(c_idx))), shape=(n_all, n_all)
            )
            inf = influence(normalize(a), weights)[: cols.F]
            order = np.argsort(-inf, kind="stable")
            pending = order[~visited[order]][: min(cfg.update_every * batch, budget - n_visited)]
        # group rows by layer so each backward pass injects at few layers
        pending = pending[np.argsort(cols.layer_of[pending], kind="stable")]
        chunks = [pending[s : s + batch] for s in range(0, len(pending), batch)]
        run_batches([([("feature", int(j)) for j in idx], [int(j) for j in idx]) for idx in chunks])
        visited[pending] = True
        n_visited += len(pending)
    tick(finished=True)
    a_all = sp.csr_matrix((np.concatenate(vals), (np.concatenate(r_idx), np.concatenate(c_idx))), shape=(n_all, n_all))
    graph = _package(model, rec, cols, tlist, tvals[0].detach(), a_all, visited)
    graph.meta.update({
        "model": model.spec, "transcoders": tcs.source, "family": model.family.name,
        "config": asdict(cfg), "batch_size": batch,
        "seconds": round(time.perf_counter() - t0, 3), "n_active_features": cols.F,
        "n_visited_features": int(visited.sum()),
        "dropped": _dropped_summary(dropped, len(row_nodes)),
    })  # fmt: skip
    return graph


def _dropped_summary(dropped: dict[int, dict[str, float]], n_rows: int) -> dict[str, Any]:
    if not dropped:
        return {"rows_capped": 0, "rows": n_rows, "max_abs_frac": 0.0, "mean_abs_frac": 0.0}
    fr = [d["abs_frac"] for d in dropped.values()]
    return {"rows_capped": len(dropped), "rows": n_rows, "max_abs_frac": max(fr), "mean_abs_frac": sum(fr) / n_rows}


def _package(
    model: Model, rec: Recording, cols: _Rows, tlist: list[Target], tvals: Tensor, a_all: sp.csr_matrix,
    visited: np.ndarray,
) -> Graph:  # fmt: skip
    """Keep visited features (sorted by layer, position, feature), errors, tokens and targets, in that order."""
    sel = np.nonzero(visited)[0]
    info = np.array([cols.feature(int(j))[:3] for j in sel], dtype=np.int64).reshape(-1, 3)
    acts = np.array([cols.feature(int(j))[3] for j in sel], dtype=np.float32)
    order = np.lexsort((info[:, 2], info[:, 1], info[:, 0])) if len(sel) else np.zeros(0, dtype=np.int64)
    sel, info, acts = sel[order], info[order], acts[order]
    keep_cols = np.concatenate([sel, np.arange(cols.F, cols.n_cols + len(tlist))])
    a = a_all.tocsr()[keep_cols][:, keep_cols].tocsr()
    a.eliminate_zeros()
    tokens = rec.ids.numpy().astype(np.int64)
    token_strs = [_decode(model, int(t)) for t in tokens]
    targets = [
        {
            "label": t.label,
            "tokens": t.plus,
            "minus": t.minus,
            "probability": t.probability,
            "weight": t.weight,
            "value": float(v),
        }
        for t, v in zip(tlist, tvals.tolist(), strict=True)
    ]
    prompt = model.tokenizer.decode(tokens.tolist()) if model.tokenizer is not None else " ".join(map(str, tokens))
    return Graph(
        prompt=prompt, tokens=tokens, token_strs=token_strs, n_layers=cols.L,
        feat_layer=info[:, 0].copy(), feat_pos=info[:, 1].copy(), feat_id=info[:, 2].copy(), feat_act=acts,
        targets=targets, adjacency=a,
    )  # fmt: skip


def dense_bytes(graph: Graph) -> int:
    """What the same graph would take as a dense float32 n_nodes x n_nodes matrix."""
    return int(graph.n_nodes) ** 2 * 4
