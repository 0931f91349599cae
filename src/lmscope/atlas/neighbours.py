"""Feature neighbours: nearest features by decoder cosine, and the features each one co-fires with.

Co-firing is counted on a systematic sample of tokens (every `stride`-th non-special token of the build),
whose active feature sets are kept in compressed (CSR) form, so memory is bounded by the sample size times
L0. The counts C[i, j] (tokens of the sample where both i and j fire) are counted in chunks of features from the
pairs of features that fire on one token, never as a dense d_sae x d_sae matrix.
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

    def top(self, k: int = 10, chunk: int = 512, max_pairs: int = 1 << 22) -> tuple[Tensor, Tensor, Tensor]:
        """(counts, ids, fraction), each [d_sae, k]: the features co-firing most often with each feature.

        fraction = counts / (sampled tokens where the feature itself fired), i.e. P(j fires | i fires).
        For a chunk of features i, C[i, j] is counted from the pairs (i, j) of features firing on one sampled token,
        enumerated by index arithmetic on the sample sorted by token (work: the number of such pairs, about the
        sample size times L0 squared), into a dense [chunk, d_sae] block whose top k are taken.
        """
        k = min(k, self.d_sae - 1)
        counts = torch.zeros(self.d_sae, k)
        ids = torch.zeros(self.d_sae, k, dtype=torch.long)
        if not self.rows or k <= 0:
            return counts, ids, torch.zeros(self.d_sae, k)
        r, c = torch.cat(self.rows), torch.cat(self.cols)
        order = torch.argsort(r, stable=True)
        r, c = r[order], c[order]  # CSR: each sampled token's features together
        per_row = torch.bincount(r, minlength=self.n_rows)
        row_start = torch.cumsum(per_row, 0) - per_row
        own = torch.zeros(self.d_sae).index_add_(0, c, torch.ones(c.numel()))
        by_col = torch.argsort(c, stable=True)  # the entries of each chunk of features, found by binary search
        c_sorted = c[by_col]
        F = self.d_sae
        block = torch.zeros(chunk * F)
        for s in range(0, F, chunk):
            e = min(s + chunk, F)
            lo, hi = (int(x) for x in torch.searchsorted(c_sorted, torch.tensor([s, e])))
            blk = block[: (e - s) * F]
            blk.zero_()
            ent = by_col[lo:hi]  # entries (token, i) with i in the chunk
            n_pair = per_row[r[ent]]
            ends = torch.cumsum(n_pair, 0)
            a = 0
            while a < len(ent):  # pieces of at most `max_pairs` pairs (at least one entry), to bound memory
                b = max(a + 1, int(torch.searchsorted(ends, int(ends[a] - n_pair[a]) + max_pairs, right=True)))
                e_ab, n_ab = ent[a:b], n_pair[a:b]
                first = torch.repeat_interleave(row_start[r[e_ab]], n_ab)
                step = torch.arange(int(n_ab.sum())) - torch.repeat_interleave(torch.cumsum(n_ab, 0) - n_ab, n_ab)
                key = torch.repeat_interleave(c[e_ab] - s, n_ab) * F + c[first + step]  # (i - s, j): j fires with i
                blk.index_add_(0, key, torch.ones(key.numel()))
                a = b
            blk = blk.view(e - s, F)
            rows = torch.arange(e - s)
            blk[rows, rows + s] = -1.0
            v, i = blk.topk(k, dim=1)
            counts[s:e], ids[s:e] = v.clamp_min(0), i
        frac = counts / own.clamp_min(1).unsqueeze(1)
        return counts, ids, frac
