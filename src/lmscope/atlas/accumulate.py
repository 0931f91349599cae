"""Per-feature running statistics for the atlas, updated one batch at a time in bounded memory.

Everything is a dense tensor indexed by feature, so memory is independent of the number of tokens:

- counts, sums and maxima (density, mean and max activation);
- top-k examples: per feature the k contexts with the largest activation (one example per context, at the
  context's maximum), each with the window of activations around it;
- quantile samples and the histogram, on a per-feature power-of-two scale S >= running max. The range [0, S) is
  cut into `bins` equal bins (histogram: `hist_bins`). Each quantile bin keeps the `samples` firings with the
  smallest random keys seen in it ("bottom-s" sampling), which is a uniform sample without replacement of all
  firings in that bin. A firing's key is a hash of (seed, context id, position, feature), not a draw from a
  stream, so it does not depend on the order firings arrive in. When the running max exceeds S, S doubles (as
  often as needed) and bins merge pairwise: histogram counts add, and the bottom-s of a union is the bottom-s of
  the bottom-s sets, so the samples stay exactly uniform within every bin. S is kept strictly above the running
  max, so at the end max < S <= 2 max and between bins/2 and bins bins of width S/bins cover (0, max].

Because S is always the smallest power of two above the max and the keys are hashes, accumulators of disjoint
parts of a corpus merge exactly (`merge`): counts and histograms add after aligning S, the top-k of the union is
the top-k of the two top-k sets (activation descending, then context id ascending), and the bottom-s of the union
is the bottom-s of the two bottom-s sets. N ranks that each accumulate every N-th batch, merged, give what one
process gives (the activation sums up to float rounding).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

EMPTY_KEY = float("inf")
_M1, _M2, _GOLD = -4658895280553007687, -7723592293110705685, -7046029254386353131  # splitmix64 constants (signed)


def _mix(x: Tensor) -> Tensor:
    """splitmix64's finaliser on int64 (wrapping arithmetic): a well-spread hash of each value."""
    x = x ^ ((x >> 30) & ((1 << 34) - 1))
    x = x * _M1
    x = x ^ ((x >> 27) & ((1 << 37) - 1))
    x = x * _M2
    return x ^ ((x >> 31) & ((1 << 33) - 1))


def hash_keys(seed: int, ctx: Tensor, pos: Tensor, feature: Tensor) -> Tensor:
    """float64 keys in [0, 1), a deterministic hash of (seed, context id, position, feature) for each firing."""
    h = _mix((torch.full_like(ctx, seed) + 1) * _GOLD + ctx)
    h = _mix(h * _GOLD + pos)
    h = _mix(h * _GOLD + feature)
    return ((h >> 11) & ((1 << 53) - 1)).to(torch.float64) * (2.0**-53)


@dataclass
class Examples:
    """A set of stored examples: activation, context id, position and the activation window."""

    act: Tensor  # [..., n]
    ctx: Tensor  # int64, -1 = empty
    pos: Tensor  # int64
    win: Tensor  # [..., n, W] float32: activations at pos - before .. pos + after (0 outside the context)


def _rank_in_groups(groups: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """For a sorted 1-D tensor of group ids: (unique groups, index of each element's group, rank within group)."""
    uniq, counts = torch.unique_consecutive(groups, return_counts=True)
    gidx = torch.repeat_interleave(torch.arange(len(uniq), device=groups.device), counts)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(len(groups), device=groups.device) - starts[gidx]
    return uniq, gidx, rank


class FeatureAccumulator:
    def __init__(
        self,
        d_sae: int,
        top_k: int = 16,
        bins: int = 16,
        samples: int = 4,
        hist_bins: int = 64,
        before: int = 16,
        after: int = 8,
        device: torch.device | str = "cpu",
        seed: int = 0,
    ) -> None:
        for name, v in (("bins", bins), ("hist_bins", hist_bins)):
            if v < 1 or v & (v - 1):
                raise ValueError(f"{name} must be a power of two, got {v}")
        self.F, self.k, self.K, self.s, self.HB = d_sae, top_k, bins, samples, hist_bins
        self.before, self.after = before, after
        self.W = before + after + 1
        dev = torch.device(device)
        self.device = dev
        self.seed = seed
        F, W = d_sae, self.W
        self.n_tokens = 0
        self.n_fired = torch.zeros(F, dtype=torch.int64, device=dev)
        self.sum_act = torch.zeros(F, dtype=torch.float64, device=dev)
        self.max_act = torch.zeros(F, device=dev)
        self.scale = torch.zeros(F, device=dev)  # S: 0 until the feature first fires
        self.hist = torch.zeros(F, hist_bins, dtype=torch.int64, device=dev)
        self.q_count = torch.zeros(F, bins, dtype=torch.int64, device=dev)
        self.top = Examples(
            torch.zeros(F, top_k, device=dev),
            torch.full((F, top_k), -1, dtype=torch.int64, device=dev),
            torch.zeros(F, top_k, dtype=torch.int64, device=dev),
            torch.zeros(F, top_k, W, device=dev),
        )
        self.q_key = torch.full((F, bins, samples), EMPTY_KEY, dtype=torch.float64, device=dev)
        self.q = Examples(
            torch.zeros(F, bins, samples, device=dev),
            torch.full((F, bins, samples), -1, dtype=torch.int64, device=dev),
            torch.zeros(F, bins, samples, dtype=torch.int64, device=dev),
            torch.zeros(F, bins, samples, W, device=dev),
        )

    # ------------------------------------------------------------------ helpers
    def _windows(self, z: Tensor, b: Tensor, p: Tensor, f: Tensor) -> Tensor:
        """[n, W] activations of feature f around position p of context b (zero outside the context)."""
        C = z.shape[1]
        offs = torch.arange(-self.before, self.after + 1, device=z.device)
        pos = p.unsqueeze(1) + offs
        valid = (pos >= 0) & (pos < C)
        vals = z[b.unsqueeze(1), pos.clamp(0, C - 1), f.unsqueeze(1)]
        return vals.float() * valid

    def _rescale(self, bmax: Tensor) -> None:
        """Raise S to cover the batch maximum, merging bins pairwise for each doubling."""
        fresh = (self.scale == 0) & (bmax > 0)
        if fresh.any():
            mant, exp = torch.frexp(bmax[fresh])
            self.scale[fresh] = torch.ldexp(torch.ones_like(mant), exp)  # 2^e > bmax (mant in [0.5, 1))
        grow = (self.scale > 0) & (bmax >= self.scale)  # keep max < S, so no activation sits on S itself
        if not grow.any():
            return
        fs = grow.nonzero().squeeze(1)
        m = (torch.floor(torch.log2(bmax[fs] / self.scale[fs])).to(torch.int64) + 1).clamp_min(1)
        m = m + (self.scale[fs] * torch.pow(2.0, m.float()) <= bmax[fs]).to(torch.int64)
        for mv in m.unique().tolist():
            sel = fs[m == mv]
            self._merge(sel, 2 ** int(mv))
            self.scale[sel] = self.scale[sel] * float(2 ** int(mv))

    def _merge(self, fs: Tensor, factor: int) -> None:
        n = len(fs)
        for name, nb in (("hist", self.HB), ("q_count", self.K)):
            t = getattr(self, name)
            f = min(factor, nb)
            merged = t[fs].reshape(n, nb // f, f).sum(-1)
            t[fs] = torch.cat([merged, merged.new_zeros(n, nb - nb // f)], dim=1)
        f = min(factor, self.K)
        nb = self.K // f
        keys = self.q_key[fs].reshape(n, nb, f * self.s)
        kv, ki = keys.topk(self.s, dim=-1, largest=False)

        def pick(t: Tensor, fill: float | int) -> Tensor:
            extra = t.shape[3:]
            g = t[fs].reshape(n, nb, f * self.s, *extra)
            idx = ki.reshape(n, nb, self.s, *([1] * len(extra))).expand(n, nb, self.s, *extra)
            out = g.gather(2, idx)
            pad = out.new_full((n, self.K - nb, self.s, *extra), fill)
            return torch.cat([out, pad], dim=1)

        q = self.q
        self.q_key[fs] = torch.cat([kv, kv.new_full((n, self.K - nb, self.s), EMPTY_KEY)], dim=1)
        q.act[fs], q.ctx[fs], q.pos[fs], q.win[fs] = pick(q.act, 0.0), pick(q.ctx, -1), pick(q.pos, 0), pick(q.win, 0.0)

    # ------------------------------------------------------------------ update
    @torch.no_grad()
    def update(self, z: Tensor, special: Tensor, ctx_ids: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Add a batch: z [B, C, F] raw latents, special [B, C] bool, ctx_ids [B] int64 global context ids.

        Special tokens (BOS, separators, padding) are excluded from every statistic and are never chosen as
        examples, but their activations appear in the windows as they are. Returns the firings of the
        non-special tokens as (b, p, f, a): context in the batch, position, feature, activation.
        """
        B, _, F = z.shape
        b, p, f = (z > 0).nonzero(as_tuple=True)  # the only pass over the dense latents
        keep = ~special[b, p]
        b, p, f = b[keep], p[keep], f[keep]
        a = z[b, p, f].float()
        self.n_tokens += int((~special).sum())
        self.n_fired += torch.bincount(f, minlength=F)
        self.sum_act.index_add_(0, f, a.double())
        bmax = torch.zeros(F, device=z.device).scatter_reduce_(0, f, a, "amax")
        self._rescale(bmax)
        self.max_act = torch.maximum(self.max_act, bmax)
        # one top-k candidate per (context, feature): the context's maximum and its position
        key = b * F + f
        cmax = torch.zeros(B * F, device=z.device).scatter_reduce_(0, key, a, "amax")
        at_max = a == cmax[key]
        cpos = torch.zeros(B * F, dtype=torch.int64, device=z.device)
        cpos[key[at_max]] = p[at_max]
        self._update_top(z, cmax.view(B, F), cpos.view(B, F), ctx_ids)
        if len(f):
            unit = a / self.scale[f]
            hb = (unit * self.HB).to(torch.int64).clamp_(0, self.HB - 1)
            self.hist.view(-1).index_add_(0, f * self.HB + hb, torch.ones_like(hb))
            qb = (unit * self.K).to(torch.int64).clamp_(0, self.K - 1)
            g = f * self.K + qb
            self.q_count.view(-1).index_add_(0, g, torch.ones_like(g))
            self._update_quantiles(z, g, a, b, p, f, ctx_ids)
        return b, p, f, a

    def _update_top(self, z: Tensor, cmax: Tensor, cpos: Tensor, ctx_ids: Tensor) -> None:
        # Only a feature with a context above its k-th best (strictly: an equal one comes later in the stream, so
        # it loses the tie) and above 0 gains an example; the rows sorted are those features'.
        t = self.top
        rows = ((t.act[:, -1:] < cmax.T) & (cmax.T > 0)).any(1).nonzero().squeeze(1)
        if not len(rows):
            return
        vals = torch.cat([t.act[rows], cmax[:, rows].T], dim=1)  # [rows, k + B]
        # a stable sort, not topk: equal activations keep stream order (the lower context id first), the order
        # `merge` uses, so a build split over ranks keeps the same examples
        new_v, sel = (x[:, : self.k] for x in torch.sort(vals, dim=1, descending=True, stable=True))
        is_new = (sel >= self.k) & (new_v > 0)
        keep_old = sel.clamp(max=self.k - 1)
        act, ctx, pos = (x[rows].gather(1, keep_old) for x in (t.act, t.ctx, t.pos))
        win = t.win[rows].gather(1, keep_old.unsqueeze(-1).expand(-1, -1, self.W))
        ri, si = is_new.nonzero(as_tuple=True)
        fi, bi = rows[ri], sel[ri, si] - self.k
        pi = cpos[bi, fi]
        act[ri, si] = new_v[ri, si]
        ctx[ri, si] = ctx_ids[bi]
        pos[ri, si] = pi
        win[ri, si] = self._windows(z, bi, pi, fi)
        empty = new_v <= 0
        ctx[empty], act[empty] = -1, 0.0
        t.act[rows], t.ctx[rows], t.pos[rows], t.win[rows] = act, ctx, pos, win

    def _update_quantiles(
        self, z: Tensor, g: Tensor, a: Tensor, b: Tensor, p: Tensor, f: Tensor, ctx_ids: Tensor
    ) -> None:
        key = hash_keys(self.seed, ctx_ids[b], p, f)
        qk = self.q_key.view(-1, self.s)
        keep = key < qk[g].amax(-1)
        if not keep.any():
            return
        g, a, b, p, f, key = g[keep], a[keep], b[keep], p[keep], f[keep], key[keep]
        order = torch.argsort(key)
        order = order[torch.argsort(g[order], stable=True)]
        g, a, b, p, f, key = g[order], a[order], b[order], p[order], f[order], key[order]
        uniq, gidx, rank = _rank_in_groups(g)
        m = rank < self.s
        a, b, p, f, key, gidx, rank = a[m], b[m], p[m], f[m], key[m], gidx[m], rank[m]
        T = len(uniq)
        new_key = torch.full((T, self.s), EMPTY_KEY, dtype=torch.float64, device=g.device)
        new_key[gidx, rank] = key
        kv, ki = torch.cat([qk[uniq], new_key], dim=1).topk(self.s, dim=1, largest=False)  # bottom-s of [T, 2s]
        # Slot (t, j) with ki >= s holds new item `lookup[t, ki - s]`; only groups with such a slot change.
        lookup = torch.full((T, self.s), -1, dtype=torch.int64, device=g.device)
        lookup[gidx, rank] = torch.arange(len(a), device=g.device)
        empty = kv == EMPTY_KEY
        changed = ((ki >= self.s) & ~empty).any(1)
        uniq, kv, ki, lookup, empty = uniq[changed], kv[changed], ki[changed], lookup[changed], empty[changed]
        q = self.q
        flat = (q.act.view(-1, self.s), q.ctx.view(-1, self.s), q.pos.view(-1, self.s), q.win.view(-1, self.s, self.W))
        old_i = ki.clamp(max=self.s - 1)
        res = [t[uniq].gather(1, old_i) for t in flat[:3]]
        res.append(flat[3][uniq].gather(1, old_i.unsqueeze(-1).expand(-1, -1, self.W)))
        res[0][empty], res[1][empty] = 0.0, -1  # still unfilled (possibly picked from the new items' padding)
        ti, si = ((ki >= self.s) & ~empty).nonzero(as_tuple=True)
        item = lookup[ti, ki[ti, si] - self.s]
        res[0][ti, si] = a[item]
        res[1][ti, si] = ctx_ids[b[item]]
        res[2][ti, si] = p[item]
        res[3][ti, si] = self._windows(z, b[item], p[item], f[item])
        qk[uniq] = kv
        for dst, src in zip(flat, res, strict=True):
            dst[uniq] = src

    # ------------------------------------------------------------------ merging
    STATE = ("n_fired", "sum_act", "max_act", "scale", "hist", "q_count", "q_key")
    EXAMPLES = ("act", "ctx", "pos", "win")

    def state(self) -> list[Tensor]:
        """Every tensor of the state, in a fixed order (what another rank sends to be merged)."""
        head = [torch.tensor([self.n_tokens], dtype=torch.int64, device=self.device)]
        examples = [getattr(self.top, n) for n in self.EXAMPLES] + [getattr(self.q, n) for n in self.EXAMPLES]
        return head + [getattr(self, n) for n in self.STATE] + examples

    def empty_like_state(self) -> list[Tensor]:
        return [torch.empty_like(t) for t in self.state()]

    def load_state(self, tensors: list[Tensor]) -> None:
        it = iter(tensors)
        self.n_tokens = int(next(it).item())
        for n in self.STATE:
            setattr(self, n, next(it).to(self.device))
        self.top = Examples(*(next(it).to(self.device) for _ in self.EXAMPLES))
        self.q = Examples(*(next(it).to(self.device) for _ in self.EXAMPLES))

    def _align(self, target: Tensor) -> None:
        """Raise S to `target` (a power of two, or 0) for every feature where it is larger, merging bins."""
        grow = (self.scale > 0) & (target > self.scale)
        fresh = (self.scale == 0) & (target > 0)
        self.scale[fresh] = target[fresh]
        if not grow.any():
            return
        fs = grow.nonzero().squeeze(1)
        factor = torch.round(torch.log2(target[fs] / self.scale[fs])).to(torch.int64)
        for m in factor.unique().tolist():
            sel = fs[factor == m]
            self._merge(sel, 2 ** int(m))
            self.scale[sel] = target[sel]

    @torch.no_grad()
    def merge(self, other: FeatureAccumulator) -> None:
        """Add `other`, an accumulator of a disjoint part of the same corpus with the same settings (see the
        module doc: exact, and independent of the order of merging)."""
        if (other.F, other.k, other.K, other.s, other.HB, other.W, other.seed) != (
            self.F, self.k, self.K, self.s, self.HB, self.W, self.seed
        ):  # fmt: skip
            raise ValueError("merge: the two accumulators were made with different settings")
        target = torch.maximum(self.scale, other.scale.to(self.device))
        other_scale = other.scale.clone()
        self._align(target)
        o = FeatureAccumulator.__new__(FeatureAccumulator)
        o.__dict__ = {**other.__dict__}
        o.load_state([t.clone().to(self.device) for t in other.state()])
        o.scale = other_scale.to(self.device)
        o._align(target)
        self.n_tokens += o.n_tokens
        self.n_fired += o.n_fired
        self.sum_act += o.sum_act
        self.max_act = torch.maximum(self.max_act, o.max_act)
        self.hist += o.hist
        self.q_count += o.q_count
        # top-k of the union: activation descending, then context id ascending; empty slots last
        act = torch.cat([self.top.act, o.top.act], 1)
        ctx = torch.cat([self.top.ctx, o.top.ctx], 1)
        empty = ctx < 0
        big = ctx.max() + 1 if ctx.numel() else 1
        order = torch.argsort(torch.where(empty, big, ctx), dim=1, stable=True)  # secondary key first
        a2 = torch.where(empty, torch.full_like(act, -float("inf")), act).gather(1, order)
        order = order.gather(1, torch.argsort(-a2, dim=1, stable=True))[:, : self.k]
        for n in self.EXAMPLES:
            both = torch.cat([getattr(self.top, n), getattr(o.top, n)], 1)
            idx = order if both.dim() == 2 else order.unsqueeze(-1).expand(-1, -1, self.W)
            setattr(self.top, n, both.gather(1, idx))
        # bottom-s of the union in every quantile bin
        keys = torch.cat([self.q_key, o.q_key], 2)
        kv, ki = keys.topk(self.s, dim=2, largest=False, sorted=True)
        self.q_key = kv
        for n in self.EXAMPLES:
            both = torch.cat([getattr(self.q, n), getattr(o.q, n)], 2)
            idx = ki if both.dim() == 3 else ki.unsqueeze(-1).expand(-1, -1, -1, self.W)
            setattr(self.q, n, both.gather(2, idx))

    # ------------------------------------------------------------------ results
    def _ranges(self, nb: int) -> tuple[Tensor, Tensor]:
        width = self.scale / nb
        n = (torch.floor(self.max_act / width.clamp_min(1e-30)) + 1).clamp(1, nb).to(torch.int64)
        return width, torch.where(self.max_act > 0, n, torch.zeros_like(n))

    def bin_ranges(self) -> tuple[Tensor, Tensor]:
        """(width of a quantile bin, number of bins covering (0, max]) per feature (0 bins if dead)."""
        return self._ranges(self.K)

    def hist_ranges(self) -> tuple[Tensor, Tensor]:
        """(width of a histogram bin, number of bins covering (0, max]) per feature."""
        return self._ranges(self.HB)
