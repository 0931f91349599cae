"""`ActivationStore`: the one reader of activations that every later stage uses.

Two sources, one interface:

    store = ActivationStore.open("acts/")                                  # shards written by `lmscope harvest`
    store = ActivationStore.streaming(model, "stdlib", ["blocks.6.resid_post"], tokens=1_000_000)  # no disk

    scale = store.mean_norm("blocks.6.resid_post")     # to normalise a dictionary's input
    for batch in store.batches(batch_size=4096):      # shuffled; every row exactly once per epoch
        x = batch["blocks.6.resid_post"]               # [4096, d_model] float32

Several hooks of one harvest come in the same batch (same rows), so several dictionaries train in one pass.
Shuffling takes random chunks of rows from the memory-mapped shards into a window of bounded size, shuffles
it, and hands out half of it at a time; on disk the window holds row numbers and each batch is gathered from
the maps in one copy (activations/mapped.py). `peak_buffer_bytes` reports the memory the window's rows take.
Special tokens (BOS/EOS/pad/separators, whose norms are huge outliers) are excluded unless asked for.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from lmscope.activations.format import (
    CorruptShardError,
    HarvestError,
    check_shard,
    file_sha256,
    mean_norms,
    read_manifest,
    storage_dtype,
)
from lmscope.activations.harvest import forward_batch
from lmscope.activations.mapped import MappedShard
from lmscope.core import native
from lmscope.corpora import ContextBatch, ContextPacker, Corpus, PackingConfig, open_corpus
from lmscope.model.adapter import Model

Batch = dict[str, torch.Tensor]


class ActivationStore:
    """Batches of activations for one or more hooks, from disk (`open`) or straight from a model (`streaming`)."""

    def __init__(self) -> None:  # use ActivationStore.open or ActivationStore.streaming
        self.hooks: list[str] = []
        self.widths: dict[str, int] = {}
        self.exclude_special = True
        self.dtype = torch.float16
        self.peak_buffer_bytes = 0
        self.directory: Path | None = None
        self.manifest: dict[str, Any] = {}
        self._verify = True
        self._verified: set[int] = set()
        self._norms: dict[str, float] | None = None
        self._stream: dict[str, Any] | None = None

    # ------------------------------------------------------------------ constructors
    @classmethod
    def open(
        cls,
        directory: str | Path,
        hooks: Sequence[str] | None = None,
        exclude_special: bool = True,
        verify: bool = True,
    ) -> ActivationStore:
        """Open a harvest directory. `verify` checks each shard's sha256 the first time it is read."""
        self = cls()
        d = Path(directory)
        self.directory, self.manifest = d, read_manifest(d)
        have = list(self.manifest["hooks"])
        self.hooks = list(hooks) if hooks else have
        missing = [h for h in self.hooks if h not in have]
        if missing:
            raise HarvestError(f"{d} has no activations for {missing}; it holds {have}")
        if not self.manifest["shards"]:
            raise HarvestError(f"{d} holds no complete shard yet; run (or resume) its harvest first")
        for shard in self.manifest["shards"]:
            problem = check_shard(d, shard, checksum=False)
            if problem:
                raise CorruptShardError(f"refusing {d}: {problem}. {_FIX.format(d=d)}")
        self.exclude_special, self._verify = exclude_special, verify
        self.dtype = storage_dtype(self.manifest["dtype"])
        with safe_open(str(d / self.manifest["shards"][0]["file"]), framework="pt") as f:
            self.widths = {h: int(f.get_slice(h).get_shape()[-1]) for h in self.hooks}
        return self

    @classmethod
    def streaming(
        cls,
        model: Model,
        corpus: Corpus | str,
        hooks: Sequence[str],
        tokens: int | None = None,
        context: int = 128,
        packing: PackingConfig | None = None,
        batch_contexts: int = 16,
        exclude_special: bool = True,
        norm_sample_tokens: int = 16_384,
    ) -> ActivationStore:
        """Activations computed on the fly from `model` over `corpus`: nothing is written to disk.

        `tokens` caps one epoch (None: the whole corpus). Mean norms are estimated from the first
        `norm_sample_tokens` tokens.
        """
        self = cls()
        for h in hooks:
            model.resolve(h)
        cfg = replace(packing or PackingConfig(), context=context)  # its `context` is replaced by `context`
        self.hooks, self.exclude_special, self.dtype = list(hooks), exclude_special, model.dtype
        self._stream = {
            "model": model,
            "corpus": open_corpus(corpus),
            "packer": ContextPacker(model.tokenizer, cfg),
            "contexts": None if tokens is None else math.ceil(tokens / context),
            "batch_contexts": batch_contexts,
            "norm_sample": norm_sample_tokens,
        }
        with torch.inference_mode(), model.capture(self.hooks) as acts:
            forward_batch(model, acts, self.hooks, torch.zeros(1, 2, dtype=torch.long))
            self.widths = {h: int(acts[h].shape[-1]) for h in self.hooks}
        return self

    # ------------------------------------------------------------------ description
    @property
    def d_model(self) -> int:
        return self.widths[self.hooks[0]]

    @property
    def packing(self) -> PackingConfig | None:
        """How the tokens were packed: the streaming packer's config, or what a harvest's manifest recorded (its
        tokenizer batching sizes are not recorded, so they read back as the defaults); None if not recorded."""
        if self._stream is not None:
            cfg: PackingConfig = self._stream["packer"].cfg
            return cfg
        recorded = self.manifest.get("packing")
        return PackingConfig.from_dict(recorded) if recorded is not None else None

    @property
    def n_rows(self) -> int | None:
        """Rows one epoch yields (after exclusions), or None when streaming an uncapped corpus."""
        if self._stream is not None:
            return None
        key = "rows_kept" if self.exclude_special else "rows"
        return sum(s[key] for s in self.manifest["shards"])

    def mean_norm(self, hook: str | None = None) -> float:
        """Mean L2 norm of the hook's activations over non-special tokens (to normalise dictionary input)."""
        hook = hook or self.hooks[0]
        if hook not in self.hooks:
            raise HarvestError(f"this store does not read {hook!r}; it reads {self.hooks}")
        return self.mean_norms()[hook]

    def mean_norms(self) -> dict[str, float]:
        if self._norms is None:
            if self._stream is None:
                self._norms = mean_norms(self.manifest["shards"], self.hooks)
            else:
                self._norms = self._stream_norms()
        return dict(self._norms)

    def __repr__(self) -> str:
        src = str(self.directory) if self._stream is None else "streaming"
        return f"ActivationStore({src}, hooks={self.hooks}, rows={self.n_rows}, dtype={self.dtype})"

    # ------------------------------------------------------------------ reading
    def read_shard(self, index: int, names: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """Every row of one shard, in order, special tokens included (checksum verified first)."""
        assert self.directory is not None, "read_shard needs an on-disk store"
        self._check(index)
        path = self.directory / self.manifest["shards"][index]["file"]
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in (names or [*self.hooks, "tokens", "document", "position", "special"])}

    def batches(
        self,
        batch_size: int = 4096,
        shuffle: bool = True,
        seed: int = 0,
        buffer_mb: float = 512.0,
        epochs: int = 1,
        drop_last: bool = False,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        with_tokens: bool = False,
    ) -> Iterator[Batch]:
        """Batches {hook: [batch_size, width]} (+ "tokens" with `with_tokens`), each row once per epoch.

        Memory held by the shuffle buffer stays under `buffer_mb` megabytes (see `peak_buffer_bytes`).
        """
        row_bytes = sum(self.widths[h] for h in self.hooks) * self.dtype.itemsize + (8 if with_tokens else 0)
        bound = int(buffer_mb * 1e6)
        capacity = int(bound / (1.5 * row_bytes))  # buffer + a chunk read (<= capacity/4 rows, held twice)
        if capacity < 4 * batch_size:
            need = 6 * batch_size * row_bytes / 1e6
            raise HarvestError(
                f"buffer_mb={buffer_mb} is too small for batch_size={batch_size} with these hooks; "
                f"use buffer_mb >= {need:.3g} or a smaller batch"
            )
        chunk_rows = max(1, capacity // 4)
        names = [*self.hooks, *(["tokens"] if with_tokens else [])]
        self.peak_buffer_bytes = 0
        for epoch in range(epochs):
            gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            if self._stream is None:  # rows gathered straight from the mapped shards
                window = _Window(self, names, row_bytes, shuffle, gen, device, dtype)
                yield from window.batches(chunk_rows, capacity, batch_size, drop_last)
                continue
            chunks = self._stream_chunks(chunk_rows, with_tokens)
            yield from self._shuffle(chunks, names, capacity, batch_size, shuffle, gen, drop_last, device, dtype)

    def _shuffle(
        self,
        chunks: Iterator[Batch],
        names: list[str],
        capacity: int,
        batch_size: int,
        shuffle: bool,
        gen: torch.Generator,
        drop_last: bool,
        device: str | torch.device,
        dtype: torch.dtype,
    ) -> Iterator[Batch]:
        buf: Batch = {}
        n = 0

        def emit(rows: int) -> Iterator[Batch]:
            nonlocal n
            order = torch.randperm(n, generator=gen) if shuffle else torch.arange(n)
            for s in range(0, rows, batch_size):
                idx = order[s : min(s + batch_size, rows)]
                yield {k: _convert(k, buf[k][:n].index_select(0, idx), device, dtype) for k in names}
            rest = order[rows:]
            if shuffle:  # fill the holes below the new end with the kept rows above it (their order is random anyway)
                gone = order[:rows]
                holes, movers = gone[gone < len(rest)], rest[rest >= len(rest)]
                for k in names:
                    buf[k].index_copy_(0, holes, buf[k].index_select(0, movers))
            else:  # keep the rest in order
                for k in names:
                    buf[k][: len(rest)] = buf[k][:n].index_select(0, rest)
            n = len(rest)

        for chunk in chunks:
            if not buf:
                buf = {k: torch.empty((capacity, *chunk[k].shape[1:]), dtype=chunk[k].dtype) for k in names}
            m = len(chunk[names[0]])
            if n + m > capacity:  # full: hand out all but half of it, whole batches only
                out = (n - capacity // 2) // batch_size * batch_size
                yield from emit(out)
            for k in names:
                buf[k][n : n + m] = chunk[k]
            n += m
            held = sum(t.numel() * t.element_size() for t in buf.values()) + 2 * _nbytes(chunk)
            self.peak_buffer_bytes = max(self.peak_buffer_bytes, held)
        if n:
            last = n if not drop_last else n // batch_size * batch_size
            yield from emit(last)

    def _map(self, index: int, names: Sequence[str]) -> MappedShard:
        """The shard's tensors `names` (+ "special") as views of its memory map, verified on its first mapping."""
        assert self.directory is not None
        shard = self.manifest["shards"][index]
        check = self._verify and index not in self._verified
        mapped = MappedShard(
            self.directory / shard["file"], [*names, "special"], shard["sha256"] if check else None,
            _FIX.format(d=self.directory),
        )  # fmt: skip
        self._verified.add(index)
        return mapped

    def _check(self, index: int) -> None:
        if not self._verify or index in self._verified:
            return
        assert self.directory is not None
        shard = self.manifest["shards"][index]
        if file_sha256(self.directory / shard["file"]) != shard["sha256"]:
            raise CorruptShardError(
                f"refusing {self.directory / shard['file']}: its checksum does not match the manifest (the file "
                f"is corrupt). {_FIX.format(d=self.directory)}"
            )
        self._verified.add(index)

    # ------------------------------------------------------------------ streaming
    def _stream_rows(self, max_contexts: int | None, with_tokens: bool) -> Iterator[Batch]:
        st = self._stream
        assert st is not None
        model, packer = st["model"], st["packer"]
        made = 0
        with model.capture(self.hooks) as acts:
            for batch in packer.contexts(st["corpus"].documents(), st["batch_contexts"]):
                if max_contexts is not None and made >= max_contexts:
                    return
                b = batch if max_contexts is None else _head(batch, max_contexts - made)
                made += len(b)
                forward_batch(model, acts, self.hooks, torch.from_numpy(b.tokens))
                n = b.tokens.size
                chunk = {h: acts[h].reshape(n, -1).cpu() for h in self.hooks}
                chunk["special"] = torch.from_numpy(b.special.reshape(-1).astype("uint8"))
                if with_tokens:
                    chunk["tokens"] = torch.from_numpy(b.tokens.reshape(-1))
                yield chunk

    def _stream_chunks(self, chunk_rows: int, with_tokens: bool) -> Iterator[Batch]:
        assert self._stream is not None
        for chunk in self._stream_rows(self._stream["contexts"], with_tokens):
            kept = _exclude(chunk, self.exclude_special)
            if kept is None:
                continue
            m = len(kept[self.hooks[0]])
            for a in range(0, m, chunk_rows):
                yield {k: v[a : a + chunk_rows] for k, v in kept.items()}

    def _stream_norms(self) -> dict[str, float]:
        st = self._stream
        assert st is not None
        contexts = max(1, math.ceil(st["norm_sample"] / st["packer"].cfg.context))
        if st["contexts"] is not None:
            contexts = min(contexts, st["contexts"])
        sums, count = dict.fromkeys(self.hooks, 0.0), 0
        for chunk in self._stream_rows(contexts, False):
            kept = _exclude(dict(chunk), True) or _exclude(chunk, False)  # all special: the norms of every row
            assert kept is not None
            for h in self.hooks:
                sums[h] += float(kept[h].double().norm(dim=-1).sum())
            count += len(kept[self.hooks[0]])
        if not count:
            raise HarvestError("the corpus yielded no tokens to estimate mean norms from; it is empty")
        return {h: s / count for h, s in sums.items()}


_FIX = "Run `lmscope verify {d}` to list bad shards; delete them and rerun the harvest command to recompute them"


def _head(batch: ContextBatch, n: int) -> ContextBatch:
    return ContextBatch(batch.tokens[:n], batch.document[:n], batch.position[:n], batch.special[:n])


def _exclude(chunk: Batch, exclude_special: bool) -> Batch | None:
    """The chunk without its special-token rows (a copy where any are dropped); None when no row is kept."""
    special = chunk.pop("special")
    if not exclude_special or not bool(special.any()):
        return chunk
    keep = (special == 0).nonzero().squeeze(1)
    if not len(keep):
        return None
    return {k: v[keep] for k, v in chunk.items()}


def _nbytes(chunk: Batch) -> int:
    return sum(t.numel() * t.element_size() for t in chunk.values())


def _convert(name: str, t: torch.Tensor, device: str | torch.device, dtype: torch.dtype) -> torch.Tensor:
    return t.to(device) if name == "tokens" else t.to(device=device, dtype=dtype)


_MAP_AHEAD = 2  # shards mapped (and verified) at once: one per core of a small machine
_MAPS_KEPT = 64  # shards kept mapped when the window no longer refers to them (each map holds a file descriptor)


class _Window:
    """The shuffle of an on-disk store, holding row references instead of rows.

    Chunks of `chunk_rows` rows are taken from the shards in a random order; the window holds the global row numbers
    (a shard's first row number plus the row) of their kept rows, up to `capacity` of them. When the next chunk
    would overflow it, all but half of the window (whole batches) is handed out in a random order and the other half
    stays, as a buffer of rows would. A batch's rows are gathered from the shards' memory maps in one copy per row
    (grouped by shard, then put back in the drawn order); a shard stays mapped while the window refers to it.
    """

    def __init__(
        self, store: ActivationStore, names: list[str], row_bytes: int, shuffle: bool, gen: torch.Generator,
        device: str | torch.device, dtype: torch.dtype,
    ) -> None:  # fmt: skip
        self.store, self.names, self.row_bytes, self.shuffle, self.gen = store, names, row_bytes, shuffle, gen
        self.device, self.dtype = device, dtype
        rows = [int(s["rows"]) for s in store.manifest["shards"]]
        self.first = torch.tensor([0, *rows]).cumsum(0)  # first global row number of each shard (and the end)
        self.rows = rows
        self.mapped: dict[int, MappedShard] = {}
        self.refs = torch.empty(0, dtype=torch.long)

    def batches(self, chunk_rows: int, capacity: int, batch_size: int, drop_last: bool) -> Iterator[Batch]:
        plan = [(i, a, min(a + chunk_rows, n)) for i, n in enumerate(self.rows) for a in range(0, n, chunk_rows)]
        if self.shuffle:
            plan = [plan[i] for i in torch.randperm(len(plan), generator=self.gen).tolist()]
        pending: list[torch.Tensor] = []
        n = 0
        order = list(dict.fromkeys(shard for shard, _, _ in plan))  # the shards in their order of first use
        for shard, start, stop in plan:
            if shard not in self.mapped:  # map (and verify) it and the next new shard at once, on two threads
                ahead = [i for i in order[order.index(shard) :] if i not in self.mapped][:_MAP_AHEAD]
                self._map_all(ahead)
            kept = self._kept(shard, start, stop)
            if n + len(kept) > capacity:  # full: hand out all but half of it, whole batches only
                self.refs = torch.cat([self.refs, *pending])
                pending = []
                yield from self._hand_out((n - capacity // 2) // batch_size * batch_size, batch_size, shard)
                n = len(self.refs)
            if len(kept):
                pending.append(kept + int(self.first[shard]))
                n += len(kept)
            held = n * (self.row_bytes + 8) + 2 * batch_size * self.row_bytes
            self.store.peak_buffer_bytes = max(self.store.peak_buffer_bytes, held)
        self.refs = torch.cat([self.refs, *pending])
        yield from self._hand_out(n if not drop_last else n // batch_size * batch_size, batch_size, None)
        self.mapped.clear()

    def _map_all(self, shards: list[int]) -> None:
        """Map (verifying on first use) several shards at once: the hash and the page-table fill release the GIL,
        so two shards take about as long as one."""
        if len(shards) < 2:
            for index in shards:
                self._shard(index)
            return
        with ThreadPoolExecutor(len(shards), thread_name_prefix="lmscope-map") as pool:
            futures = [pool.submit(self.store._map, i, self.names) for i in shards]
            maps = [f.result() for f in futures]  # the first failure is raised here, after all have finished
        for index, mapped in zip(shards, maps, strict=True):
            self.mapped[index] = mapped

    def _shard(self, index: int) -> MappedShard:
        mapped = self.mapped.pop(index, None) or self.store._map(index, self.names)
        self.mapped[index] = mapped  # the dict's order is the order of use
        return mapped

    def _kept(self, shard: int, start: int, stop: int) -> torch.Tensor:
        """The chunk's rows to keep (special tokens left out unless the store keeps them), as rows of the shard."""
        special = self._shard(shard).tensors["special"][start:stop]
        if self.store.exclude_special and bool(special.any()):
            return (special == 0).nonzero().squeeze(1) + start
        return torch.arange(start, stop)

    def _hand_out(self, rows: int, batch_size: int, keep_mapped: int | None) -> Iterator[Batch]:
        refs = self.refs
        order = torch.randperm(len(refs), generator=self.gen) if self.shuffle else None
        for s in range(0, rows, batch_size):
            chosen = refs[order[s : min(s + batch_size, rows)]] if order is not None else refs[s : s + batch_size]
            yield self._gather(chosen)
        self.refs = refs[order[rows:]] if order is not None else refs[rows:]
        if len(self.mapped) > _MAPS_KEPT:  # unmap the shards the window no longer refers to, oldest first
            live = set((torch.bucketize(self.refs, self.first, right=True) - 1).unique().tolist())
            for index in [i for i in self.mapped if i not in live and i != keep_mapped]:
                if len(self.mapped) <= _MAPS_KEPT:
                    break
                del self.mapped[index]  # unmapped once its views are gone

    def _gather(self, refs: torch.Tensor) -> Batch:
        """The rows `refs` (global row numbers) of every hook, in that order."""
        shard = torch.bucketize(refs, self.first, right=True) - 1
        lib = native.library()
        if lib is not None:  # one C copy per row, from each shard's map straight into the drawn order
            ids = shard.unique().tolist()
            maps = {i: self._shard(i) for i in ids}
            local = refs - self.first[shard]
            return {name: self._native_rows(lib, name, maps, shard, local) for name in self.names}
        back = None
        if self.shuffle:  # grouped by shard for the gather, then put back in the drawn order
            by_shard = torch.argsort(shard, stable=True)
            refs, shard = refs[by_shard], shard[by_shard]
            back = torch.argsort(by_shard)
        ids, counts = torch.unique_consecutive(shard, return_counts=True)
        segments = []  # (the shard's map, where its rows go in the batch, their rows in the shard), once per batch
        a = 0
        for i, c in zip(ids.tolist(), counts.tolist(), strict=True):
            segments.append((self._shard(i), slice(a, a + c), refs[a : a + c] - int(self.first[i])))
            a += c
        out: Batch = {}
        for name in self.names:
            first = segments[0][0].tensors[name]
            rows = torch.empty((len(refs), *first.shape[1:]), dtype=first.dtype)
            for mapped, where, local in segments:
                torch.index_select(mapped.tensors[name], 0, local, out=rows[where])
            if back is not None:
                rows = rows.index_select(0, back)
            out[name] = _convert(name, rows.long() if name == "tokens" else rows, self.device, self.dtype)
        return out

    def _native_rows(
        self, lib: Any, name: str, maps: dict[int, MappedShard], shard: torch.Tensor, local: torch.Tensor
    ) -> torch.Tensor:
        """`name`'s row local[i] of shard shard[i] for every i, through core/native.py's row gather."""
        first = next(iter(maps.values())).tensors[name]
        rows = torch.empty((len(local), *first.shape[1:]), dtype=first.dtype)
        bases = torch.zeros(len(self.rows), dtype=torch.long)
        for i, mapped in maps.items():
            t = mapped.tensors[name]
            if not t.is_contiguous() or t.shape[1:] != first.shape[1:] or t.dtype != first.dtype:
                raise CorruptShardError(
                    f"shard {i} of {self.store.directory} holds {name} as {tuple(t.shape)} {t.dtype}, unlike the "
                    f"others ({tuple(first.shape[1:])} {first.dtype}); harvest the store again"
                )
            bases[i] = t.data_ptr()
        row_bytes = rows[0].numel() * rows.element_size() if len(rows) else 0
        threads = torch.get_num_threads() if len(rows) * row_bytes >= 1 << 20 else 1
        ptrs = (shard.data_ptr(), local.data_ptr(), len(local), row_bytes, rows.data_ptr())
        if lib.lmscope_gather_rows(bases.data_ptr(), len(bases), *ptrs, threads) != 0:
            raise HarvestError(f"a batch of {self.store.directory} referred to a shard it does not have (a bug)")
        return _convert(name, rows.long() if name == "tokens" else rows, self.device, self.dtype)
