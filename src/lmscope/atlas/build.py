"""`build_atlas`: one streaming pass of model + dictionary over a corpus, written to a single SQLite file.

The pass keeps only per-feature state (see `accumulate.py`), so memory does not grow with the number of
tokens. The database is written to `OUT.partial` (contexts as they stream, everything else at the end, in
one transaction whose last row is `meta.complete = 1`) and renamed to OUT only when complete. A rerun after
an interruption deletes an unfinished `.partial` and starts again; a `.partial` that is already complete
(killed between commit and rename) is simply renamed.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lmscope.atlas.accumulate import FeatureAccumulator
from lmscope.atlas.config import AtlasConfig
from lmscope.atlas.db import write as db_write
from lmscope.atlas.db.schema import SCHEMA_VERSION, AtlasError, Connection, create, get_meta, is_complete, set_meta
from lmscope.atlas.distributed import gather_to_main, merge_accumulators, stack_chunks, unstack_chunks
from lmscope.atlas.from_store import StoreActivations
from lmscope.atlas.neighbours import CofireSample
from lmscope.atlas.provenance import dictionary_hash, load_eval_metrics, model_hash
from lmscope.atlas.write import write_results
from lmscope.core.distributed import all_reduce_sum as dist_all_reduce_sum
from lmscope.core.distributed import barrier
from lmscope.core.distributed import rank as dist_rank
from lmscope.core.distributed import world_size as dist_world
from lmscope.core.progress import ProgressCallback, ProgressEvent, emit, resolve
from lmscope.corpora import ContextPacker, Corpus, open_corpus
from lmscope.dictionaries.base import Dictionary
from lmscope.dictionaries.metrics import FVUAccumulator, batch_moments
from lmscope.model.adapter import Model


def _partial(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def _remove_db(path: Path) -> None:
    for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        p.unlink(missing_ok=True)


def _contexts(packer: ContextPacker, corpus: Corpus, cfg: AtlasConfig) -> Iterator[Any]:
    n = math.ceil(cfg.tokens / cfg.context)
    made = 0
    for batch in packer.contexts(corpus.documents(), batch_size=cfg.batch_size):
        take = min(len(batch), n - made)
        if take < len(batch):
            batch.tokens, batch.document = batch.tokens[:take], batch.document[:take]
            batch.position, batch.special = batch.position[:take], batch.special[:take]
        yield batch
        made += take
        if made >= n:
            return


def _load_model(model: Model | str, device: str, dtype: str) -> Model:
    if isinstance(model, str):
        from lmscope.model.loading import load_model

        return load_model(model, device=device, dtype=dtype)
    return model


def _load_inputs(
    model: Model | str, dictionary: Dictionary | str | Path, device: str, dtype: str, hook: str | None = None
) -> tuple[Model, Dictionary, str | None]:
    model = _load_model(model, device, dtype)
    dict_path = None
    if not isinstance(dictionary, Dictionary):
        from lmscope.dictionaries.pretrained import open_dictionary

        dict_path = str(Path(dictionary).resolve())
        dictionary = open_dictionary(dictionary, hook=hook)  # lmscope, SAELens, sparsify or Gemma Scope
    return model, dictionary, dict_path


def _store_input(
    activations: str | Path | None,
    model: Model,
    dictionary: Dictionary,
    hook: str,
    corpus: Corpus,
    cfg: AtlasConfig,
    other: Model | None,
) -> StoreActivations | None:
    """The harvest to read the activations from, checked (None: run the model)."""
    if activations is None:
        return None
    if other is not None:
        raise AtlasError("a crosscoder's atlas runs both models; build it without activations=")
    dcfg = dictionary.cfg
    out_hook = dcfg.hook_out if dcfg.is_transcoder and dcfg.hook_out and dcfg.hook_out != hook else None
    return StoreActivations(activations, model, corpus, [hook] + ([out_hook] if out_hook else []), cfg)


def _check_other(model: Model, dictionary: Dictionary, other: Model | None) -> None:
    """A two-model crosscoder reads [BASE | OTHER] and needs OTHER; any other dictionary reads one model."""
    n = dictionary.cfg.n_models
    if n > 2:
        raise AtlasError(f"an atlas reads one model or a two-model crosscoder; this dictionary has n_models={n}")
    if n == 2 and other is None:
        raise AtlasError(
            "this dictionary is a crosscoder over two models ([BASE | OTHER] activations); pass the second model "
            "with --other OTHER (other=...), the model it was trained against"
        )
    if n == 1 and other is not None:
        raise AtlasError("--other is only for a two-model crosscoder; this dictionary reads one model")
    if other is not None:
        if other.d_model != model.d_model or 2 * model.d_model != dictionary.cfg.d_in:
            raise AtlasError(
                f"the crosscoder reads d_in={dictionary.cfg.d_in} = 2 x d_model, but the models are "
                f"{model.d_model} and {other.d_model} wide"
            )
        if model.tokenizer.get_vocab() != other.tokenizer.get_vocab():
            raise AtlasError("BASE and OTHER have different tokenizers; a crosscoder atlas needs the same one")


def build_atlas(
    model: Model | str,
    dictionary: Dictionary | str | Path,
    corpus: Corpus | str = "stdlib",
    *,
    tokens: int | None = None,
    out: str | Path = "atlas.db",
    config: AtlasConfig | None = None,
    hook: str | None = None,
    overwrite: bool = False,
    progress: ProgressCallback | bool | None = None,
    command: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    log: Callable[[str], None] | None = None,
    other: Model | str | None = None,
    activations: str | Path | None = None,
) -> Path:
    """Build a feature atlas of `dictionary` on `model` over `tokens` tokens of `corpus`; returns the path.

    `model` is a Model or a model spec, `dictionary` a Dictionary or an lmscope dictionary directory. A two-model
    crosscoder (`n_models=2`) reads [model | other] at its hook, so it needs `other` (the fine-tune it was trained
    against); its atlas also stores each latent's relative decoder norm and band, and its logit effects are its
    OTHER half read through OTHER's unembedding.
    `hook` overrides the dictionary's `cfg.hook`. The file at `out` appears only once it is complete.
    `progress` is called with events of task "atlas" counting tokens (see lmscope.core.progress).
    `activations`: a harvest directory of this model, corpus and packing holding the hook; the build reads the
    activations from it instead of running the model (see atlas/from_store.py; not for a crosscoder).
    """
    from lmscope._version import __version__

    progress = resolve(progress)
    log = log or (lambda _msg: None)
    cfg = config or AtlasConfig()
    if tokens is not None:
        cfg = replace(cfg, tokens=int(tokens))
    out = Path(out)
    partial = _partial(out)
    main, n_ranks = dist_rank() == 0, dist_world()
    if out.exists() and not overwrite:
        raise AtlasError(f"{out} already exists; pass --overwrite (overwrite=True) or choose another --out")
    finishing = partial.exists() and not overwrite and is_complete(partial)
    barrier()  # every rank has looked before rank 0 renames or removes anything
    if finishing:
        if main:
            log(f"{partial} is a complete build that was not renamed (interrupted at the very end); finishing it")
            os.replace(partial, out)
        barrier()
        return out
    if partial.exists() and main:
        log(f"removing the unfinished build {partial} left by an interrupted run; starting again")
        _remove_db(partial)
    model, dictionary, dict_path = _load_inputs(model, dictionary, device, dtype, hook)
    other_model = _load_model(other, device, dtype) if other is not None else None
    _check_other(model, dictionary, other_model)
    if hook and dict_path is not None:
        hook = dictionary.cfg.hook  # open_dictionary put the hook in lmscope's names
    hook = hook or dictionary.cfg.hook
    if not hook:
        raise AtlasError(
            "the dictionary does not name its hook (cfg.hook); pass hook= (--hook), e.g. blocks.6.resid_post"
        )
    model.resolve(hook)
    if other_model is not None:
        other_model.resolve(hook)
    corpus = open_corpus(corpus)
    corpus.record_names = True  # the atlas says which document each context came from (context_sources)
    packer = ContextPacker(model.tokenizer, cfg.packing)
    stored = _store_input(activations, model, dictionary, hook, corpus, cfg, other_model)
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.time()
    if not main:  # another rank: its share of the batches, merged on rank 0, which writes the file
        _stream(model, dictionary, hook, corpus, packer, cfg, None, None, other_model, stored)
        barrier()
        return out
    conn = create(partial)
    try:
        acc, cofire, metrics = _stream(
            model, dictionary, hook, corpus, packer, cfg, conn, progress, other_model, stored
        )
        provenance = {
            "lmscope_version": __version__,
            "schema_version": SCHEMA_VERSION,
            "command": command,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "build_seconds": round(time.time() - started, 2),
            "model": {"spec": model.spec, "class": type(model.hf).__name__, "family": model.family.name,
                      "n_layers": model.n_layers, "d_model": model.d_model, "dtype": str(model.dtype)},
            "model_hash": model_hash(model),
            "dictionary": {"path": dict_path, "config": dictionary.cfg.to_dict(),
                           "sha256": dictionary_hash(dictionary),
                           "training": getattr(dictionary, "metadata", {}).get("training", {})},
            "hook": hook,
            "activations": None if stored is None else stored.describe(),  # read from a harvest, not the model
            "other": None if other_model is None else {
                "spec": other_model.spec, "class": type(other_model.hf).__name__, "hash": model_hash(other_model)},
            "special_token_ids": packer.special_ids,  # left out of every statistic (the web greys them)
            "corpus": {"fingerprint": corpus.fingerprint(), "description": corpus.describe(),
                       "stats": vars(corpus.stats)},
            "config": cfg.to_dict(),
            "ranks": n_ranks,
        }  # fmt: skip
        write_results(conn, model, dictionary, acc, cofire, metrics, provenance, cfg, dict_path, log, other_model)
        if cfg.families:  # the optional families and map tables, in their own transaction (atlas/families.py)
            from lmscope.atlas.families import write_at_build

            write_at_build(conn, dictionary.W_dec, log)
        conn.close()
    except BaseException:
        with contextlib.suppress(Exception):
            conn.close()
        raise
    os.replace(partial, out)
    barrier()
    return out


def _stream(
    model: Model,
    dictionary: Dictionary,
    hook: str,
    corpus: Corpus,
    packer: ContextPacker,
    cfg: AtlasConfig,
    conn: Connection | None,
    progress: ProgressCallback | None,
    other: Model | None = None,
    stored: StoreActivations | None = None,
) -> tuple[FeatureAccumulator, CofireSample, dict[str, float]]:
    """One pass over the corpus. Under torchrun, batch i is this rank's if i mod N == rank; rank 0 (`conn` given)
    writes every context and returns the merged results (atlas/distributed.py); the others return theirs, unused."""
    dcfg = dictionary.cfg
    target_hook = dcfg.hook_out if dcfg.is_transcoder and dcfg.hook_out else None
    hooks = [hook] + ([target_hook] if target_hook and target_hook != hook else [])
    dev = model.device
    R, W = dist_rank(), dist_world()
    dictionary = dictionary.to(dev).float().eval()
    acc = FeatureAccumulator(
        dcfg.d_sae, cfg.top_k, cfg.bins, cfg.samples_per_bin, cfg.hist_bins, cfg.window_before,
        cfg.window_after, device=dev, seed=cfg.seed,
    )  # fmt: skip
    cofire = CofireSample(dcfg.d_sae)
    target = math.ceil(cfg.tokens / cfg.context) * cfg.context
    stride = max(1, target // max(1, cfg.cofire_tokens))
    moments: list[tuple[int, list[Tensor]]] = []  # per batch of this rank: its reconstruction moments
    sampled: list[tuple[int, list[Tensor]]] = []  # per batch: its co-firing sample (rows, cols, number of rows)
    sampled_entries = 0
    l0 = 0
    n_ctx = 0
    emit(progress, ProgressEvent(task="atlas", done=0, total=target, unit="tokens"))
    other_capture = other.capture([hook], stop_early=True) if other is not None else contextlib.nullcontext()
    capture: contextlib.AbstractContextManager[Any] = (
        model.capture(hooks, stop_early=True) if stored is None else contextlib.nullcontext({})
    )
    batches = ((b, None) for b in _contexts(packer, corpus, cfg)) if stored is None else stored.batches()
    with capture as acts, other_capture as acts_o, torch.inference_mode():
        for i, (batch, from_store) in enumerate(batches):
            B, C = batch.tokens.shape
            if i % W == R:
                if from_store is None:
                    model(torch.from_numpy(batch.tokens))
                else:  # a harvest's rows: no forward pass
                    acts = {h: t.to(dev) for h, t in from_store.items()}
                x = acts[hook].float()
                if other is not None and acts_o is not None:  # a crosscoder reads [BASE | OTHER], rebuilds both
                    other(torch.from_numpy(batch.tokens))
                    x = torch.cat([x, acts_o[hook].float().to(x.device)], dim=-1)
                if x.shape[-1] != dcfg.d_in:
                    raise AtlasError(
                        f"{hook} is {x.shape[-1]} wide but the dictionary expects d_in={dcfg.d_in}; pass the hook "
                        "the dictionary was trained on (--hook)"
                    )
                z = dictionary.encode(x)
                special = torch.from_numpy(batch.special).to(dev)
                ctx_ids = torch.arange(n_ctx, n_ctx + B, device=dev)
                b, p, f, a = acc.update(z, special, ctx_ids)
                # evaluation metrics on the non-special tokens; the reconstruction decoded from the sparse firings
                tok = b * C + p
                zs = torch.sparse_coo_tensor(torch.stack([tok, f]), a, (B * C, dcfg.d_sae), check_invariants=False)
                recon = (torch.sparse.mm(zs, dictionary.W_dec) + dictionary.b_dec).reshape(B, C, -1)[~special]
                y = (acts[target_hook].float() if target_hook else x)[~special]
                n_b, sse_b, mean_b, m2_b = batch_moments(y, recon)
                moments.append((i, [torch.tensor([n_b]), sse_b.reshape(1).double(), mean_b.double(),
                                    m2_b.reshape(1).double()]))  # fmt: skip
                l0 += len(f)
                # co-firing sample: every `stride`-th token of the stream that is not special
                flat_idx = torch.arange(n_ctx * C, (n_ctx + B) * C, device=dev).reshape(B, C)
                pick = ((flat_idx % stride == 0) & ~special).reshape(-1)
                if pick.any() and sampled_entries < cofire.max_entries:
                    row_of = torch.cumsum(pick, 0) - 1
                    sel = pick[tok]
                    rows, cols = row_of[tok[sel]].cpu(), f[sel].cpu()
                    sampled.append((i, [rows, cols, torch.tensor([int(pick.sum())])]))
                    sampled_entries += len(rows)
            if conn is not None:
                db_write.insert_contexts(conn, n_ctx, batch.tokens)
                if any(corpus.names):
                    db_write.insert_context_sources(conn, n_ctx, batch.document, corpus.names)
            n_ctx += B
            emit(progress, ProgressEvent(task="atlas", done=n_ctx * C, total=target, unit="tokens"))
    if conn is not None:
        db_write.commit(conn)
    emit(progress, ProgressEvent(task="atlas", done=n_ctx * cfg.context, total=target, unit="tokens", finished=True))
    if n_ctx == 0:
        raise AtlasError(
            f"the corpus yielded no complete context of {cfg.context} tokens; use a larger corpus or a smaller "
            "--context"
        )
    if W > 1:
        merge_accumulators(acc, R, W)
        d_y = int(dcfg.d_out or dcfg.d_in) if target_hook else int(dcfg.d_in)
        got_m = gather_to_main(stack_chunks(moments, [0, 0, d_y, 0]), R, W, dev)
        got_s = gather_to_main(stack_chunks(sampled, [0, 0, 0]), R, W, dev)
        l0_t = torch.tensor([l0], dtype=torch.int64)
        dist_all_reduce_sum(l0_t)
        l0 = int(l0_t.item())
        if got_m is None or got_s is None:
            return acc, cofire, {}
        moments = sorted((c for flat in got_m for c in unstack_chunks(flat)), key=lambda c: c[0])
        sampled = sorted((c for flat in got_s for c in unstack_chunks(flat)), key=lambda c: c[0])
    err = FVUAccumulator()  # reconstruction error of the non-special tokens, batch by batch in stream order
    for _i, (cnt, sse_t, mean_t, m2_t) in moments:
        err.add_moments(int(cnt.reshape(-1)[0]), sse_t.reshape(()), mean_t.reshape(-1), m2_t.reshape(()))
    for _i, (rows, cols, n_rows) in sampled:
        cofire.add(rows.cpu(), cols.cpu(), int(n_rows.reshape(-1)[0]))
    n = max(1, err.n)
    n_alive = int((acc.n_fired > 0).sum())
    metrics = {
        "tokens": acc.n_tokens,
        "contexts": n_ctx,
        "fvu": err.value(),
        "mse": err.sse / n,  # per token (summed over the width)
        "l0": l0 / n,
        "dead": dcfg.d_sae - n_alive,
        "dead_fraction": (dcfg.d_sae - n_alive) / dcfg.d_sae,
        "dense": int((acc.n_fired.float() / max(1, acc.n_tokens) > 0.1).sum()),
    }
    return acc, cofire, metrics


__all__ = ["AtlasConfig", "build_atlas", "get_meta", "load_eval_metrics", "set_meta"]
