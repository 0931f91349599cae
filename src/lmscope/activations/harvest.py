"""Activation harvesting into a resumable, verifiable on-disk store.

Layout of an output directory:

    manifest.json              what was harvested, how, and each complete shard's checksum
    shard_00000.safetensors    one file per shard: every hook's activations [rows, width] in the chosen
    shard_00001.safetensors    dtype, plus int32 `tokens`, int64 `document`, int32 `position` and
    ...                        uint8 `special` (1 = BOS/EOS/pad/separator: exclude from training)

Rows are tokens in corpus order: row r of the store is position r % context of context r // context.
Each shard is written atomically, then the manifest is rewritten atomically to list it, so after a
kill -9 the manifest names only complete shards and a rerun resumes right after the last of them. Shard
boundaries are also batch boundaries, so a resumed run computes exactly the batches an uninterrupted run
would: the stores are bit-identical.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import queue
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save as st_save

from lmscope._version import __version__
from lmscope.activations.format import (
    DTYPE_NAMES,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    SHARD_FMT,
    HarvestError,
    check_shard,
    mean_norms,
    model_fingerprint,
    read_manifest,
    storage_dtype,
)
from lmscope.activations.rank_manifests import fold_rank_files, is_rank_file, rank_file
from lmscope.core.atomic import atomic_write_bytes, atomic_write_json, remove_stale_temps
from lmscope.core.distributed import barrier
from lmscope.core.distributed import rank as dist_rank
from lmscope.core.distributed import world_size as dist_world
from lmscope.core.prefetch import prefetch
from lmscope.core.progress import ProgressCallback, ProgressEvent, emit, resolve
from lmscope.corpora import ContextBatch, ContextPacker, Corpus, CorpusError, PackingConfig, open_corpus
from lmscope.model.adapter import Model


@dataclass
class HarvestConfig:
    """What to harvest. `tokens` is rounded up to whole contexts; `shard_tokens` down to whole contexts."""

    hooks: list[str]
    tokens: int = 2_000_000
    context: int = 128
    dtype: str = "float16"
    batch_size: int = 32  # contexts per forward pass
    shard_tokens: int = 65_536
    packing: PackingConfig | None = None  # its `context` is replaced by `context` above
    queue_shards: int = 2  # shards waiting for the writer thread (memory bound: about this many + 1)

    def __post_init__(self) -> None:
        if not self.hooks:
            raise HarvestError("no hooks given; pass at least one, e.g. --hooks blocks.6.resid_post")
        if self.tokens < 1 or self.batch_size < 1 or self.shard_tokens < 1:
            raise HarvestError("tokens, batch size and shard size must be positive")
        storage_dtype(self.dtype)
        self.packing = replace(self.packing or PackingConfig(), context=self.context)

    @property
    def shard_contexts(self) -> int:
        return max(1, self.shard_tokens // self.context)

    @property
    def target_contexts(self) -> int:
        return math.ceil(self.tokens / self.context)


def _identity(model: Model, corpus: Corpus, cfg: HarvestConfig) -> dict[str, Any]:
    assert cfg.packing is not None
    return {
        "model": model_fingerprint(model),
        "hooks": list(cfg.hooks),
        "dtype": DTYPE_NAMES[storage_dtype(cfg.dtype)],
        "corpus": corpus.fingerprint(),
        "packing": cfg.packing.to_dict(),
        "shard_contexts": cfg.shard_contexts,
        "batch_size": cfg.batch_size,
    }


_WHAT = {
    "model": "model (weights hash)",
    "hooks": "hooks",
    "dtype": "storage dtype",
    "corpus": "corpus (fingerprint)",
    "packing": "context/packing",
    "shard_contexts": "shard size (contexts per shard: --shard-tokens // --context)",
    "batch_size": "batch size",
}


def identity_diff(old: dict[str, Any], new: dict[str, Any], old_manifest: dict[str, Any] | None = None) -> list[str]:
    """Human-readable differences between the identity of an existing harvest and a new request."""
    diffs = []
    for key, label in _WHAT.items():
        if old.get(key) != new.get(key):
            a, b = old.get(key), new.get(key)
            if key in ("model", "corpus"):
                extra = ""
                if old_manifest is not None:
                    was = old_manifest.get(key, {})
                    extra = f" (was {was.get('spec') or was.get('description')})"
                diffs.append(f"{label}: {str(a)[:12]}… on disk{extra}, {str(b)[:12]}… now")
            else:
                diffs.append(f"{label}: {a} on disk, {b} now")
    return diffs


def forward_batch(model: Model, acts: dict[str, torch.Tensor], hooks: list[str], tokens: torch.Tensor) -> None:
    """One forward pass inside an open `model.capture(hooks)`; fills `acts`."""
    with torch.inference_mode():
        model(tokens)
    missing = [h for h in hooks if h not in acts]
    if missing:
        raise HarvestError(f"the forward pass did not reach hook(s) {missing}")


@dataclass
class _Shard:
    index: int
    first_row: int
    tensors: dict[str, torch.Tensor]
    rows: int = 0


class _Writer:
    """Writes shards in a background thread (bounded queue), then records each in the manifest."""

    def __init__(self, directory: Path, manifest: dict[str, Any], hooks: list[str], maxsize: int,
                 manifest_file: str = MANIFEST) -> None:  # fmt: skip
        self.dir, self.manifest, self.hooks, self.manifest_file = directory, manifest, hooks, manifest_file
        self.q: queue.Queue[_Shard | None] = queue.Queue(maxsize=maxsize)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True, name="lmscope-shard-writer")
        self.thread.start()

    def put(self, shard: _Shard) -> None:
        while True:
            self.check()
            try:
                self.q.put(shard, timeout=0.2)
                return
            except queue.Full:
                continue

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        with contextlib.suppress(queue.Full):
            self.q.put(None, timeout=600)
        self.thread.join()
        self.check()

    def _run(self) -> None:
        while (shard := self.q.get()) is not None:
            if self.error is not None:
                continue  # drain after a failure
            try:
                self._write(shard)
            except BaseException as exc:
                self.error = exc

    def _write(self, shard: _Shard) -> None:
        n = shard.rows
        t = {k: v[:n].contiguous() for k, v in shard.tensors.items()}
        keep = t["special"] == 0
        record: dict[str, Any] = {
            "file": SHARD_FMT.format(shard.index),
            "first_row": shard.first_row,
            "rows": n,
            "rows_kept": int(keep.sum()),
            "tokens_sha256": hashlib.sha256(t["tokens"].numpy().tobytes()).hexdigest(),
            "norm_sum": {h: float(t[h][keep].double().norm(dim=-1).sum()) for h in self.hooks},
            "norm_sum_all": {h: float(t[h].double().norm(dim=-1).sum()) for h in self.hooks},
        }
        # one metadata key: safetensors orders several keys differently from run to run, breaking checksums
        data = st_save(t, metadata={"lmscope": json.dumps({"format": FORMAT, "first_row": shard.first_row})})
        path = self.dir / record["file"]
        try:
            atomic_write_bytes(path, data)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise HarvestError(
                    f"disk full while writing {path} ({len(data) / 1e6:.1f} MB); the partial shard was removed and "
                    f"the {len(self.manifest['shards'])} complete shard(s) are kept. Free space (or choose another "
                    "--out) and rerun the same command to resume"
                ) from exc
            raise HarvestError(f"could not write {path}: {exc}") from exc
        record["bytes"] = len(data)
        record["sha256"] = hashlib.sha256(data).hexdigest()
        self.manifest["shards"].append(record)
        self.manifest["tokens"] = sum(s["rows"] for s in self.manifest["shards"])
        self.manifest["mean_norms"] = mean_norms(self.manifest["shards"], self.hooks)
        atomic_write_json(self.dir / self.manifest_file, self.manifest)


def _is_lmscope_file(p: Path) -> bool:
    return p.name == MANIFEST or is_rank_file(p.name) or (p.name.startswith("shard_") and p.suffix == ".safetensors")


def _start_dir(out: Path, overwrite: bool) -> dict[str, Any] | None:
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out)
    if overwrite:
        for p in out.iterdir():
            if _is_lmscope_file(p):
                p.unlink()
    if (out / MANIFEST).exists():
        return read_manifest(out)
    foreign = [p.name for p in out.iterdir() if not _is_lmscope_file(p)]
    if foreign:
        raise HarvestError(
            f"{out} is not empty ({', '.join(sorted(foreign)[:5])}) and holds no lmscope manifest; "
            "choose a new or empty --out directory"
        )
    return None


def _valid_prefix(out: Path, shards: list[dict[str, Any]], log: Callable[[str], None]) -> list[dict[str, Any]]:
    """The listed shards up to the first missing or damaged one (cheap size check; `verify` does checksums)."""
    for i, shard in enumerate(shards):
        problem = check_shard(out, shard, checksum=False)
        if problem:
            log(f"{problem}; resuming from shard {i}")
            return shards[:i]
    return shards


def harvest(
    model: Model,
    corpus: Corpus | str,
    out: str | Path,
    config: HarvestConfig,
    *,
    command: str | None = None,
    progress: ProgressCallback | bool | None = None,
    overwrite: bool = False,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Harvest activations at `config.hooks` for `config.tokens` tokens of `corpus` into `out`.

    Resumes when `out` already holds a harvest with the same model, hooks, corpus, dtype and packing;
    refuses (naming what differs) otherwise. Returns the final manifest. `progress` receives task "harvest"
    events in tokens; `done` counts what a resumed run had already harvested.
    """
    log = log or (lambda _msg: None)
    report = resolve(progress)
    cfg = config
    assert cfg.packing is not None
    for h in cfg.hooks:
        model.resolve(h)
    corpus = open_corpus(corpus)
    out = Path(out)
    sdtype = storage_dtype(cfg.dtype)
    packer = ContextPacker(model.tokenizer, cfg.packing)
    identity = _identity(model, corpus, cfg)
    R, W = dist_rank(), dist_world()
    main = R == 0
    if main:
        existing = _start_dir(out, overwrite)
        if existing is not None and any(is_rank_file(p.name) for p in out.iterdir()):
            existing = fold_rank_files(out, existing)  # a killed run over several ranks: keep its complete prefix
    barrier()
    if not main:
        existing = read_manifest(out) if (out / MANIFEST).exists() else None
    if existing is not None:
        diffs = identity_diff(existing.get("identity", {}), identity, existing)
        if diffs:
            raise HarvestError(
                f"refusing to resume into {out}: it holds a harvest that differs in " + "; ".join(diffs)
                + ". Rerun with the original options, choose a new --out, or pass --overwrite to start again"
            )  # fmt: skip
        manifest = existing
        manifest["shards"] = _valid_prefix(out, manifest["shards"], log)
    else:
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "lmscope_version": __version__,
            "command": command,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "identity": identity,
            "model": {
                "spec": model.spec,
                "hash": identity["model"],
                "class": type(model.hf).__name__,
                "family": model.family.name,
                "n_layers": model.n_layers,
                "d_model": model.d_model,
                "compute_dtype": str(model.dtype).removeprefix("torch."),
            },
            "hooks": list(cfg.hooks),
            "dtype": identity["dtype"],
            "d_model": model.d_model,
            "context": cfg.context,
            "packing": cfg.packing.to_dict(),
            "corpus": {"fingerprint": identity["corpus"], "description": corpus.describe()},
            "special_token_ids": packer.special_ids,
            "bos_token_id": packer.bos_id,
            "separator_token_id": packer.sep_id,
            "shard_tokens": cfg.shard_contexts * cfg.context,
            "batch_size": cfg.batch_size,
            "shards": [],
        }
    manifest.update(target_tokens=cfg.target_contexts * cfg.context, complete=False, command=command or "")
    manifest["lmscope_version"] = __version__
    done_rows = sum(s["rows"] for s in manifest["shards"])
    done_contexts = done_rows // cfg.context
    if done_contexts >= cfg.target_contexts:
        manifest["complete"] = True
        if main:
            atomic_write_json(out / MANIFEST, manifest)
            log(f"{out} already holds {done_rows:,} tokens (>= {cfg.tokens:,} asked); nothing to do")
        barrier()
        return manifest
    if done_rows and main:
        log(f"resuming {out} after {len(manifest['shards'])} complete shard(s), {done_rows:,} tokens")
    manifest["tokens"] = done_rows
    if main:
        _check_space(out, (cfg.target_contexts - done_contexts) * cfg.context, model.d_model * len(cfg.hooks), sdtype,
                     log)  # fmt: skip
        atomic_write_json(out / MANIFEST, manifest)
    barrier()
    try:
        _run(model, corpus, packer, cfg, out, manifest, sdtype, report if main else None, R, W)
    except CorpusError:
        if not manifest["shards"] and main:
            (out / MANIFEST).unlink(missing_ok=True)  # leave no half-started store behind
        raise
    barrier()  # every rank has recorded its shards
    if main:
        if W > 1:  # each rank recorded its shards in its own file; rank 0 folds them in
            manifest = fold_rank_files(out, manifest)
        manifest["complete"] = True
        manifest["corpus"]["stats"] = vars(corpus.stats)
        manifest["corpus"]["exhausted"] = manifest["tokens"] < manifest["target_tokens"]
        atomic_write_json(out / MANIFEST, manifest)
    barrier()
    return manifest if main else read_manifest(out)


def _check_space(out: Path, rows: int, width: int, dtype: torch.dtype, log: Callable[[str], None]) -> None:
    need = rows * width * dtype.itemsize + rows * 17
    free = shutil.disk_usage(out).free
    if need > free:
        log(f"warning: this harvest needs about {need / 1e9:.2f} GB but {out} has {free / 1e9:.2f} GB free")


def _batches(
    packer: ContextPacker, corpus: Corpus, cfg: HarvestConfig, skip_shards: list[dict[str, Any]]
) -> Iterator[tuple[ContextBatch, bool]]:
    """(batch, ends_shard) in order after the skipped shards, never crossing a shard boundary."""
    rows = packer.rows(corpus.documents())
    for shard in skip_shards:  # re-read what is on disk, checking it is the same corpus
        n = shard["rows"] // cfg.context
        got = [next(rows, None) for _ in range(n)]
        if any(g is None for g in got):
            raise HarvestError(f"the corpus now ends before {shard['file']}; it changed since the harvest began")
        tokens = np.concatenate([g[0] for g in got if g is not None]).astype(np.int32)
        if hashlib.sha256(tokens.tobytes()).hexdigest() != shard["tokens_sha256"]:
            raise HarvestError(
                f"the corpus tokens differ from those in {shard['file']}: the corpus or tokenizer changed; "
                "use a new --out directory or --overwrite"
            )
    target = cfg.target_contexts - sum(s["rows"] for s in skip_shards) // cfg.context
    in_shard = 0
    pending: list[Any] = []
    for made, row in enumerate(rows, 1):
        pending.append(row)
        in_shard += 1
        end = in_shard == cfg.shard_contexts or made == target
        if end or len(pending) == cfg.batch_size:
            yield packer.stack(pending), end
            pending = []
            in_shard = 0 if end else in_shard
        if made == target:
            return
    if pending:
        yield packer.stack(pending), True


def _run(
    model: Model,
    corpus: Corpus,
    packer: ContextPacker,
    cfg: HarvestConfig,
    out: Path,
    manifest: dict[str, Any],
    sdtype: torch.dtype,
    progress: ProgressCallback | None,
    rank: int = 0,
    world: int = 1,
) -> None:
    """Harvest the batches after the manifest's shards; with `world` > 1, only the shards j with j mod world ==
    rank (recorded in this rank's own manifest file, see rank_manifests.py)."""
    hooks = list(cfg.hooks)
    c = cfg.context
    shard_rows = cfg.shard_contexts * c
    done_rows = sum(s["rows"] for s in manifest["shards"])
    total = manifest["target_tokens"]
    records = manifest if world == 1 else {"shards": []}
    writer = _Writer(out, records, hooks, cfg.queue_shards, MANIFEST if world == 1 else rank_file(rank))
    shard: _Shard | None = None
    index, row = len(manifest["shards"]), done_rows

    def report(finished: bool = False) -> None:
        emit(progress, ProgressEvent(task="harvest", done=row, total=total, unit="tokens", finished=finished))

    report()
    try:
        with model.capture(hooks, stop_early=True) as acts:
            for batch, ends in prefetch(_batches(packer, corpus, cfg, manifest["shards"]), 4, name="lmscope-tokenize"):
                n = len(batch) * c
                if index % world != rank:  # another rank's shard: only count its rows
                    row += n
                    index += int(ends)
                    report()
                    continue
                forward_batch(model, acts, hooks, torch.from_numpy(batch.tokens))
                if shard is None:
                    shard = _Shard(index, row, _alloc(acts, hooks, shard_rows, sdtype))
                s = slice(shard.rows, shard.rows + n)
                for h in hooks:
                    shard.tensors[h][s] = acts[h].reshape(n, -1).to("cpu", sdtype)
                shard.tensors["tokens"][s] = torch.from_numpy(batch.tokens.reshape(-1).astype(np.int32))
                shard.tensors["document"][s] = torch.from_numpy(batch.document.reshape(-1))
                shard.tensors["position"][s] = torch.from_numpy(batch.position.reshape(-1))
                shard.tensors["special"][s] = torch.from_numpy(batch.special.reshape(-1).astype(np.uint8))
                shard.rows += n
                row += n
                if ends:
                    writer.put(shard)
                    shard, index = None, index + 1
                report()
            if shard is not None:
                writer.put(shard)
        writer.close()
        report(finished=True)
    except BaseException:
        with contextlib.suppress(BaseException):
            writer.close()
        raise
    if row == 0:
        stats = corpus.stats
        raise CorpusError(
            f"the corpus yielded no complete context of {c} tokens ({stats.documents} document(s), "
            f"{stats.empty_documents} empty, {packer.tokens_read} tokens): it is empty or too small. "
            "Use a larger corpus or a smaller --context"
        )


def _alloc(acts: dict[str, torch.Tensor], hooks: list[str], rows: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    t = {h: torch.empty(rows, acts[h].shape[-1], dtype=dtype) for h in hooks}
    t["tokens"] = torch.empty(rows, dtype=torch.int32)
    t["document"] = torch.empty(rows, dtype=torch.int64)
    t["position"] = torch.empty(rows, dtype=torch.int32)
    t["special"] = torch.empty(rows, dtype=torch.uint8)
    return t
