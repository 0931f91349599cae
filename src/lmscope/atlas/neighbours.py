"""Feature neighbours: nearest features by decoder cosine, and the features each one co-fires with.

Co-firing is counted on a systematic sample of tokens (every `stride`-th non-special token of the build),
whose active feature sets are kept in compressed (CSR) form, so memory is bounded by the sample size times
L0. The counts C[i, j] (tokens of the sample where both i and j fire) are computed in chunks of features
with a sparse-dense product, never as a dense d_sae x d_sae matrix.
"""

from __future__ import annotations

import torch
from torch import Tensor


def decoder_neighbours(W_dec: Tensor, k: int = 10, chunk: int = 2048) -> tuple[Tensor, Tensor]:
    """(cosines, ids), each [d_sae, k]: the k features with the most similar decoder rows (self excluded)."""
    w = W_dec.detach().float().cpu()
    w = w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)
    n = w.shape[0]
    k = min(k, n - 1)
    vals, ids = [], []
    for s in range(0, n, chunk):
        sim = w[s : s + chunk] @ w.T
        rows = torch.arange(sim.shape[0])
        sim[rows, rows + s] = -float("inf")
        v, i = sim.topk(k, dim=1)
        vals.append(v)
        ids.append(i)
    if not vals or k <= 0:
        return torch.zeros(n, 0), torch.zeros(n, 0, dtype=torch.long)
    return torch.cat(vals), torch.cat(ids)


class CofireSample:
    """Active-feature sets of sampled tokens, in CSR pieces, with a bound on the stored indices."""

    def __init__(self, d_sae: int, max_entries: int = 4_000_000) -> None:
        self.d_sae = d_sae
        self.max_entries = max_entries
        self.rows: list[Tensor] = []  # per chunk: row index within the sample
        self.cols: list[Tensor] = []
        self.n_rows = 0
        self.n_entries = 0

    @property
    def full(self) -> bool:
        return self.n_entries >= self.max_entries

    def add(self, rows: Tensor, cols: Tensor, n_rows: int) -> None:
        """Firings of `n_rows` sampled tokens: token `rows[i]` (0 .. n_rows-1) fired feature `cols[i]`."""
        if self.full or n_rows == 0:
            return
        self.rows.append((rows + self.n_rows).to(torch.int64).cpu())
        self.cols.append(cols.to(torch.int64).cpu())
        self.n_rows += n_rows
        self.n_entries += int(rows.numel())

    def top(self, k: int = 10, chunk: int = 512) -> tuple[Tensor, Tensor, Tensor]:
        """(counts, ids, fraction), each [d_sae, k]: the features co-firing most often with each feature.

        fraction = counts / (sampled tokens where the feature itself fired), i.e. P(j fires | i fires).
        """
        k = min(k, self.d_sae - 1)
        counts = torch.zeros(self.d_sae, k)
        ids = torch.zeros(self.d_sae, k, dtype=torch.long)
        if not self.rows or k <= 0:
            return counts, ids, torch.zeros(self.d_sae, k)
        r, c = torch.cat(self.rows), torch.cat(self.cols)
        z = torch.sparse_coo_tensor(
            torch.stack([c, r]), torch.ones(r.numel()), (self.d_sae, self.n_rows), check_invariants=False
        ).coalesce()
        own = torch.zeros(self.d_sae).index_add_(0, c, torch.ones(c.numel()))
        dense_cols = torch.zeros(self.n_rows, chunk)
        for s in range(0, self.d_sae, chunk):
            e = min(s + chunk, self.d_sae)
            dense_cols.zero_()
            sel = (c >= s) & (c < e)
            dense_cols[r[sel], c[sel] - s] = 1.0
            block = torch.sparse.mm(z, dense_cols[:, : e - s]).T  # [e - s, d_sae]: C[i, j] for i in the chunk
            rows = torch.arange(e - s)
            block[rows, rows + s] = -1.0
            v, i = block.topk(k, dim=1)
            counts[s:e], ids[s:e] = v.clamp_min(0), i
        frac = counts / own.clamp_min(1).unsqueeze(1)
        return counts, ids, frac
