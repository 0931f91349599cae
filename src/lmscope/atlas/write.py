"""The end of an atlas build: turn the accumulated state into rows, written in one transaction that ends complete
(by lmscope.atlas.db.write)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import numpy as np

from lmscope.atlas.accumulate import FeatureAccumulator
from lmscope.atlas.config import AtlasConfig
from lmscope.atlas.db import read
from lmscope.atlas.db import write as db_write
from lmscope.atlas.db.schema import Connection
from lmscope.atlas.logits import logit_lens, top_logit_effects
from lmscope.atlas.neighbours import CofireSample, decoder_neighbours
from lmscope.atlas.provenance import load_eval_metrics
from lmscope.dictionaries.base import Dictionary
from lmscope.dictionaries.crosscoder import band, relative_norms
from lmscope.model.adapter import Model

RESIDUAL_KINDS = ("embed", "resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")


def vocab_strings(tokenizer: Any, n: int) -> list[str]:
    """Each token id decoded on its own (ids beyond the tokenizer read `<id N>`)."""
    have = min(n, len(tokenizer)) if tokenizer is not None else 0
    # one array, not a list of lists: the tokenizer converts it in one call, not element by element
    texts = list(tokenizer.batch_decode(np.arange(have, dtype=np.int64).reshape(-1, 1))) if have else []
    return texts + [f"<id {i}>" for i in range(have, n)]


def _r(x: float) -> float:
    return float(f"{x:.6g}")


def _logit_rows(
    model: Model, dictionary: Dictionary, hook: str, k: int, other: Model | None = None
) -> tuple[list[str | None], str]:
    """Each feature's top logit effects. A two-model crosscoder's are its OTHER half read through OTHER's
    unembedding (what the latent writes in the fine-tune)."""
    cfg = dictionary.cfg
    out_hook = cfg.hook_out or hook
    w_dec = dictionary.W_dec.detach()
    if other is not None:
        model, w_dec = other, w_dec[:, w_dec.shape[1] // 2 :]
    kind = model.resolve(out_hook).kind
    lens = logit_lens(model)
    d_out = int(w_dec.shape[1])
    if lens is None:
        return [None] * cfg.d_sae, "this model has no unembedding (lm_head); no logit effects"
    if kind not in RESIDUAL_KINDS or d_out != model.d_model:
        note = f"the decoder writes to {out_hook}, which is not the residual stream; no logit effects"
        return [None] * cfg.d_sae, note
    pv, pi, nv, ni = top_logit_effects(lens, w_dec, k)
    rows: list[str | None] = []
    for f in range(cfg.d_sae):
        rows.append(json.dumps({
            "positive": [[int(i), _r(v)] for v, i in zip(pv[f].tolist(), pi[f].tolist(), strict=True)],
            "negative": [[int(i), _r(v)] for v, i in zip(nv[f].tolist(), ni[f].tolist(), strict=True)],
        }))  # fmt: skip
    note = "(d * norm gain) @ W_U^T with the final norm's 1/RMS treated as constant"
    return rows, note + ("; a crosscoder: its OTHER half through OTHER's unembedding" if other is not None else "")


def _context_texts(
    conn: Connection, used: np.ndarray, vocab: list[str]
) -> tuple[dict[int, list[int]], dict[int, str], dict[int, list[int]]]:
    """For each context id in `used`: its tokens, its text (each token's vocabulary text joined; "" for an id
    outside the vocabulary) and the character offset where each token's text starts (and the end), so that the
    text of positions a..b-1 is `text[offsets[a]:offsets[b]]`, the same string as joining those tokens' texts."""
    want = set(used.tolist())
    n = len(vocab)
    tokens: dict[int, list[int]] = {}
    texts: dict[int, str] = {}
    offsets: dict[int, list[int]] = {}
    for cid, ids in read.iter_contexts(conn):
        if cid not in want:
            continue
        tokens[cid] = ids.tolist()
        pieces = [vocab[t] if 0 <= t < n else "" for t in tokens[cid]]
        texts[cid] = "".join(pieces)
        offsets[cid] = [0, *np.cumsum([len(x) for x in pieces], dtype=np.int64).tolist()]
    return tokens, texts, offsets


def _example_rows(
    acc: FeatureAccumulator,
    conn: Connection,
    vocab: list[str],
    context: int,
) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """Rows for `examples` and `quantile_bins`, ordered by feature, then its top examples by rank, then each
    quantile bin's samples by activation, descending (ties: slot order). Built with array operations: the text of
    a window is a slice of its context's text (see `_context_texts`), its activations a slice of its window."""
    top = {k: v.cpu().numpy() for k, v in vars(acc.top).items()}
    q = {k: v.cpu().numpy() for k, v in vars(acc.q).items()}
    width, n_cov = (t.cpu().numpy() for t in acc.bin_ranges())
    q_count = acc.q_count.cpu().numpy()
    max_act = acc.max_act.cpu().numpy()
    K, W = acc.K, acc.W
    # quantile bins covering (0, max]: (feature, bin, lo, hi, count)
    bf, bb = np.nonzero(np.arange(K)[None, :] < n_cov[:, None])
    w64 = width.astype(np.float64)[bf]
    lo = bb * w64
    hi = np.minimum((bb + 1) * w64, max_act.astype(np.float64)[bf])
    bin_rows = list(zip(bf.tolist(), bb.tolist(), lo.tolist(), hi.tolist(), q_count[bf, bb].tolist(), strict=True))
    # top examples: the filled slots of each feature, in slot order
    tf, tj = np.nonzero(top["ctx"] >= 0)
    t_rank = (np.cumsum(top["ctx"] >= 0, axis=1) - 1)[tf, tj]
    # quantile samples of the covered bins: filled slots by activation, descending, stably
    filled = q["ctx"] >= 0
    order = np.argsort(np.where(filled, -q["act"], np.inf), axis=-1, kind="stable")
    sorted_filled = np.take_along_axis(filled, order, -1)
    sorted_filled &= (np.arange(K)[None, :] < n_cov[:, None])[..., None]
    qf, qb, q_rank = np.nonzero(sorted_filled)
    qj = order[qf, qb, q_rank]
    n_top = len(tf)
    f = np.concatenate([tf, qf])
    grp = np.concatenate([np.full(n_top, -1), qb])  # top examples (-1) before bin 0, 1, ...
    rank = np.concatenate([t_rank, q_rank])
    ctx = np.concatenate([top["ctx"][tf, tj], q["ctx"][qf, qb, qj]])
    pos = np.concatenate([top["pos"][tf, tj], q["pos"][qf, qb, qj]])
    act = np.concatenate([top["act"][tf, tj], q["act"][qf, qb, qj]]).astype(np.float32)
    win = np.concatenate([top["win"][tf, tj], q["win"][qf, qb, qj]]).astype("<f4").reshape(-1, W)
    ro = np.lexsort((rank, grp, f))
    f, grp, rank, ctx, pos, act, win = f[ro], grp[ro], rank[ro], ctx[ro], pos[ro], act[ro], win[ro]
    first = pos - acc.before
    start = np.maximum(0, first)
    end = np.minimum(context, pos + acc.after + 1)
    a_lo = (np.arange(len(f)) * W + (start - first)) * 4  # byte offsets of each window's kept activations
    a_hi = a_lo + (end - start) * 4
    tokens, texts, offsets = _context_texts(conn, np.unique(ctx), vocab)
    blob = win.tobytes()
    rows: list[tuple[Any, ...]] = []
    kinds = ("quantile", "top")
    for fi, g, r, c, p, a, s, e, lo_b, hi_b in zip(
        f.tolist(), grp.tolist(), rank.tolist(), ctx.tolist(), pos.tolist(), act.tolist(), start.tolist(),
        end.tolist(), a_lo.tolist(), a_hi.tolist(), strict=True,
    ):  # fmt: skip
        off = offsets[c]
        rows.append((fi, kinds[g < 0], g, r, c, p, a, s, blob[lo_b:hi_b], tokens[c][p], texts[c][off[s] : off[e]]))
    return rows, bin_rows


def write_results(
    conn: Connection,
    model: Model,
    dictionary: Dictionary,
    acc: FeatureAccumulator,
    cofire: CofireSample,
    metrics: dict[str, Any],
    provenance: dict[str, Any],
    cfg: AtlasConfig,
    dict_path: str | None,
    log: Callable[[str], None],
    other: Model | None = None,
) -> None:
    """Write the vocabulary, every feature's row, examples and quantile bins, and the provenance, metrics and
    summary, in one transaction that ends with `meta.complete = 1`; then compact the file."""
    F = dictionary.cfg.d_sae
    hook = provenance["hook"]
    vocab = vocab_strings(model.tokenizer, model.vocab_size)
    logits, logit_note = _logit_rows(model, dictionary, hook, cfg.logit_top, other)
    nv, ni = decoder_neighbours(dictionary.W_dec.detach(), cfg.neighbours)
    cc, ci, cf = cofire.top(cfg.cofire)
    hwidth, hcov = (t.cpu().numpy() for t in acc.hist_ranges())
    hist = acc.hist.cpu().numpy()
    n_fired = acc.n_fired.cpu().numpy()
    sums = acc.sum_act.cpu().numpy()
    max_act = acc.max_act.cpu().numpy()
    n_tok = max(1, acc.n_tokens)
    feature_rows = []
    for f in range(F):
        nf = int(n_fired[f])
        h = {"width": _r(float(hwidth[f])), "counts": hist[f, : int(hcov[f])].tolist()}
        neigh = [[int(i), _r(v)] for v, i in zip(nv[f].tolist(), ni[f].tolist(), strict=True)]
        co = [
            [int(i), int(c), _r(fr)]
            for c, i, fr in zip(cc[f].tolist(), ci[f].tolist(), cf[f].tolist(), strict=True)
            if c > 0
        ]
        feature_rows.append((
            f, nf, nf / n_tok, float(sums[f] / nf) if nf else 0.0, float(max_act[f]), int(nf == 0),
            json.dumps(h), logits[f], json.dumps(neigh), json.dumps(co),
        ))  # fmt: skip
    log("writing examples")
    example_rows, bin_rows = _example_rows(acc, conn, vocab, cfg.context)
    cross = None
    if other is not None:  # a crosscoder: each latent's relative decoder norm and band
        rel = relative_norms(dictionary).tolist()
        cross = [(f, None if v != v else _r(v), band(v)) for f, v in enumerate(rel)]
    db_write.write_build(conn, vocab, feature_rows, example_rows, bin_rows, {  # complete = 1 is written last
        "provenance": provenance,
        "metrics": {"atlas": metrics, "saved": load_eval_metrics(dict_path)},
        "summary": {
            "model": provenance["model"]["spec"], "hook": hook, "d_sae": F, "d_in": dictionary.cfg.d_in,
            "arch": dictionary.cfg.arch, "tokens": acc.n_tokens, "context": cfg.context,
            "dead": int((n_fired == 0).sum()), "logit_effects": logit_note if logits[0] is not None else None,
            "logit_note": logit_note,
            "other": None if other is None else other.spec,
        },
    }, crosscoder_rows=cross)  # fmt: skip
    db_write.compact(conn)
