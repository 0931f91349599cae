"""Activation correlation: how alike two dictionaries' features fire, token by token, on a shared corpus.

One streaming pass runs each model over the same text (the same contexts when the tokenizers agree; text chunks
aligned by characters when they do not, see `align.py`), encodes each hook's activations with its dictionary and
keeps only the sparse codes of the shared tokens (8 bytes per firing: about 100 MB for 200k tokens of two k=32
dictionaries). Pearson correlations are then computed from float64 sums over those tokens, in blocks of A's features
(`MatchConfig.block_mb` bounds the dense part), so no [tokens, width] matrix is ever formed. The baseline pairs A's
tokens with B's tokens in a random order (a permutation of all shared tokens): the same sparsity and firing rates,
no co-occurrence.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from lmscope.core.progress import ProgressCallback, ProgressEvent, emit
from lmscope.corpora import ContextPacker, Corpus, PackingConfig, special_token_ids
from lmscope.dictionaries.base import Dictionary
from lmscope.errors import MatchError
from lmscope.model.adapter import Model
from lmscope.universality.align import ChunkAligner


@dataclass
class Side:
    """One dictionary as the activation pass runs it: its model and the hook it reads."""

    model: Model
    dictionary: Dictionary
    hook: str


@dataclass
class SharedCodes:
    """The sparse codes of the shared tokens ([n, m_a] and [n, m_b], row t of each is the same text position)."""

    za: sp.csr_matrix
    zb: sp.csr_matrix
    tokens_a: int  # text tokens of A the pass read
    alignment: str  # "same tokens" or "characters"
    dropped: dict[str, int] = field(default_factory=dict)  # text tokens of each side left unpaired

    @property
    def n(self) -> int:
        return int(self.za.shape[0])


def same_tokenizer(a: Model, b: Model) -> bool:
    return a is b or a.tokenizer.get_vocab() == b.tokenizer.get_vocab()


def _codes(side: Side, acts: dict[str, torch.Tensor], pos: torch.Tensor) -> sp.csr_matrix:
    x = acts[side.hook].float()
    d_in = side.dictionary.cfg.d_in
    if x.shape[-1] != d_in:
        raise MatchError(
            f"{side.hook} of {side.model.spec} is {x.shape[-1]} wide but its dictionary reads d_in={d_in}; pass the "
            "hook and model the dictionary was trained on (--hook / --other-hook, --model / --other-model)"
        )
    z = side.dictionary.encode(x.reshape(-1, x.shape[-1])[pos.to(x.device)])
    return sp.csr_matrix(z.float().cpu().numpy())


def check_widths(a: Side, b: Side) -> None:
    """Refuse a side whose hook does not exist on its model, or is not as wide as its dictionary reads (one token
    through each model, before the pass)."""
    for side in (a, b):
        side.model.resolve(side.hook)
        if side.dictionary.cfg.n_models != 1:
            raise MatchError("a crosscoder reads several models at once; activation matching runs one model per side")
        side.dictionary = side.dictionary.to(side.model.device).float().eval()
        tok = side.model.tokenizer
        first = tok.bos_token_id if tok.bos_token_id is not None else 0
        with side.model.capture([side.hook], stop_early=True) as acts, torch.inference_mode():
            side.model(torch.tensor([[first]]))
            _codes(side, acts, torch.zeros(1, dtype=torch.long))


def collect_codes(
    a: Side, b: Side, corpus: Corpus, tokens: int, context: int = 128, batch_size: int = 8,
    progress: ProgressCallback | None = None,
) -> SharedCodes:  # fmt: skip
    """Run both sides over `tokens` tokens of `corpus` (counted in A's tokens) and keep the shared tokens' codes."""
    for side in (a, b):
        side.dictionary = side.dictionary.to(side.model.device).float().eval()
    n_ctx = max(1, math.ceil(tokens / context))
    target = n_ctx * context
    za: list[sp.csr_matrix] = []
    zb: list[sp.csr_matrix] = []
    done = 0
    dropped = {"a": 0, "b": 0}
    one_model = a.model is b.model
    hooks_a = sorted({a.hook, b.hook}) if one_model else [a.hook]
    emit(progress, ProgressEvent(task="match", done=0, total=target, unit="tokens"))
    cap_b = contextlib.nullcontext() if one_model else b.model.capture([b.hook], stop_early=True)
    with a.model.capture(hooks_a, stop_early=True) as acts_a, cap_b as acts_b, torch.inference_mode():
        for ids_a, ids_b, pos_a, pos_b, drop in _batches(a, b, corpus, n_ctx, context, batch_size):
            a.model(torch.from_numpy(ids_a))
            if not one_model:
                b.model(torch.from_numpy(ids_b))
            got_b = acts_a if one_model else acts_b
            assert got_b is not None
            za.append(_codes(a, acts_a, torch.from_numpy(pos_a)))
            zb.append(_codes(b, got_b, torch.from_numpy(pos_b)))
            dropped["a"] += drop[0]
            dropped["b"] += drop[1]
            done += ids_a.shape[0] * ids_a.shape[1]
            emit(progress, ProgressEvent(task="match", done=min(done, target), total=target, unit="tokens"))
    emit(progress, ProgressEvent(task="match", done=min(done, target), total=target, unit="tokens", finished=True))
    if not za or sum(z.shape[0] for z in za) < 2:
        raise MatchError("the corpus gave fewer than 2 shared tokens; use a larger corpus or more --tokens")
    align = "same tokens" if same_tokenizer(a.model, b.model) else "characters"
    return SharedCodes(sp.vstack(za, format="csr"), sp.vstack(zb, format="csr"), done, align, dropped)


def _batches(
    a: Side, b: Side, corpus: Corpus, n_ctx: int, context: int, batch_size: int
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, tuple[int, int]]]:
    """(tokens of A, tokens of B, flat positions of A's and B's shared tokens, tokens dropped per side), batch by
    batch, until `n_ctx` contexts."""
    made = 0
    if same_tokenizer(a.model, b.model):
        packer = ContextPacker(a.model.tokenizer, PackingConfig(context=context))
        for batch in packer.contexts(corpus.documents(), batch_size=batch_size):
            take = min(len(batch), n_ctx - made)
            tok, special = batch.tokens[:take], batch.special[:take]
            pos = np.flatnonzero(~special.reshape(-1))
            yield tok, tok, pos, pos, (0, 0)
            made += take
            if made >= n_ctx:
                return
        return
    aligner = ChunkAligner(a.model.tokenizer, b.model.tokenizer, context, special_token_ids(a.model.tokenizer),
                           special_token_ids(b.model.tokenizer))  # fmt: skip
    for ab in aligner.batches(corpus.documents(), batch_size):
        take = min(len(ab.tokens_a), n_ctx - made)
        keep = ab.pos_a < take * context
        yield ab.tokens_a[:take], ab.tokens_b[:take], ab.pos_a[keep], ab.pos_b[keep], (ab.dropped_a, ab.dropped_b)
        made += take
        if made >= n_ctx:
            return


def _moments(z: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and standard deviation over the rows (float64; zero rows count)."""
    n = z.shape[0]
    mean = np.asarray(z.sum(axis=0), dtype=np.float64).ravel() / n
    sq = np.asarray(z.multiply(z).sum(axis=0), dtype=np.float64).ravel() / n
    return mean, np.sqrt(np.maximum(sq - mean**2, 0.0))


def silent(z: sp.csr_matrix) -> np.ndarray:
    """Features that never vary on the shared tokens (in practice: never fire); their correlation is undefined."""
    return _moments(z)[1] <= 1e-12


def correlation_blocks(
    codes: SharedCodes, rows: int, permute: np.ndarray | None = None
) -> Iterator[tuple[int, np.ndarray]]:
    """Row blocks of the Pearson correlation of A's features with B's over the shared tokens (`rows` A-features at
    a time); `permute` reorders B's tokens first (the baseline). Silent features correlate 0 with everything."""
    za = codes.za.astype(np.float64)
    zb = codes.zb.astype(np.float64)
    if permute is not None:
        zb = zb[permute]
    n = za.shape[0]
    mean_a, sd_a = _moments(za)
    mean_b, sd_b = _moments(zb)
    inv_a = np.where(sd_a > 1e-12, 1.0 / np.maximum(sd_a, 1e-300), 0.0)
    inv_b = np.where(sd_b > 1e-12, 1.0 / np.maximum(sd_b, 1e-300), 0.0)
    zat = za.T.tocsr()  # [m_a, n]: row slices are cheap
    for s in range(0, za.shape[1], rows):
        cross = (zat[s : s + rows] @ zb).toarray()  # Σ_t a_i(t) b_j(t), float64
        cross /= n
        cross -= np.outer(mean_a[s : s + rows], mean_b)
        cross *= inv_a[s : s + rows, None]
        cross *= inv_b[None, :]
        yield s, np.clip(cross, -1.0, 1.0).astype(np.float32)


def baseline_permutation(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(int(seed) + 0x5EED).permutation(n)


def describe_pass(codes: SharedCodes, a: Side, b: Side, corpus: Corpus) -> dict[str, Any]:
    """What the activation pass read, for the report."""
    return {
        "model_a": a.model.spec, "model_b": b.model.spec, "hook_a": a.hook, "hook_b": b.hook,
        "corpus": corpus.describe(), "tokens": codes.tokens_a, "shared_tokens": codes.n,
        "alignment": codes.alignment, "unpaired_tokens": codes.dropped,
    }  # fmt: skip
