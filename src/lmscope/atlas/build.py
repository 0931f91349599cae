"""`build_atlas`: one streaming pass of model + dictionary over a corpus, written to a single SQLite file.

The pass keeps only per-feature state (see `accumulate.py`), so memory does not grow with the number of
tokens. The database is written to `OUT.partial` (contexts as they stream, everything else at the end, in
one transaction whose last row is `meta.complete = 1`) and renamed to OUT only when complete. A rerun after
an interruption deletes an unfinished `.partial` and starts again; a `.partial` that is already complete
(killed between commit and rename) is simply renamed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from lmscope.atlas.accumulate import FeatureAccumulator
from lmscope.atlas.neighbours import CofireSample
from lmscope.atlas.schema import SCHEMA_VERSION, AtlasError, check_version, create, get_meta, set_meta
from lmscope.corpora import ContextPacker, Corpus, PackingConfig, open_corpus
from lmscope.dictionaries.base import Dictionary
from lmscope.model import Model


@dataclass
class AtlasConfig:
    """How an atlas is built. `bins` and `hist_bins` must be powers of two (see accumulate.py)."""

    tokens: int = 1_000_000
    context: int = 128
    batch_size: int = 8  # contexts per forward pass
    top_k: int = 16  # top-activating examples per feature
    bins: int = 16  # quantile bins over [0, S); 8..16 of them cover (0, max]
    samples_per_bin: int = 4
    hist_bins: int = 64
    window_before: int = 16  # tokens shown before an example's token
    window_after: int = 8
    neighbours: int = 10
    cofire: int = 10
    cofire_tokens: int = 32_768  # size of the co-firing token sample
    logit_top: int = 10
    seed: int = 0
    packing: PackingConfig = field(default_factory=PackingConfig)

    def __post_init__(self) -> None:
        if self.tokens < 1 or self.context < 2 or self.batch_size < 1 or self.top_k < 1:
            raise AtlasError("tokens, batch size and top_k must be positive and the context at least 2 tokens")
        for name in ("bins", "hist_bins"):
            v = getattr(self, name)
            if v < 1 or v & (v - 1):
                raise AtlasError(f"{name} must be a power of two (8, 16, 32 ...), got {v}")
        p = self.packing
        self.packing = PackingConfig(context=self.context, mode=p.mode, bos=p.bos, separator=p.separator,
                                     tokenize_batch=p.tokenize_batch)  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["packing"] = self.packing.to_dict()
        return d


def _partial(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def _remove_db(path: Path) -> None:
    for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        p.unlink(missing_ok=True)


def _partial_is_complete(path: Path) -> bool:
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            check_version(conn, path)
            return True
        finally:
            conn.close()
    except (AtlasError, sqlite3.DatabaseError):
        return False


def _progress(enabled: bool) -> Any:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("tokens"),
        TextColumn("ETA"), TimeRemainingColumn(), console=Console(stderr=True), disable=not enabled,
    )  # fmt: skip


def _dictionary_hash(d: Dictionary) -> str:
    h = hashlib.sha256()
    for name, t in sorted(d.state_dict().items()):
        t = t.detach().reshape(-1).contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{t.numel()}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


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


def _load_inputs(
    model: Model | str, dictionary: Dictionary | str | Path, device: str, dtype: str
) -> tuple[Model, Dictionary, str | None]:
    if isinstance(model, str):
        from lmscope.loading import load_model

        model = load_model(model, device=device, dtype=dtype)
    dict_path = None
    if not isinstance(dictionary, Dictionary):
        from lmscope.dictionaries.formats import load_dictionary

        dict_path = str(Path(dictionary).resolve())
        dictionary = load_dictionary(dictionary)
    return model, dictionary, dict_path


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
    progress: bool = True,
    command: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    log: Callable[[str], None] | None = None,
) -> Path:
    """Build a feature atlas of `dictionary` on `model` over `tokens` tokens of `corpus`; returns the path.

    `model` is a Model or a model spec, `dictionary` a Dictionary or an lmscope dictionary directory.
    `hook` overrides the dictionary's `cfg.hook`. The file at `out` appears only once it is complete.
    """
    from lmscope import __version__

    log = log or (lambda _msg: None)
    cfg = config or AtlasConfig()
    if tokens is not None:
        cfg = AtlasConfig(**{**asdict(cfg), "tokens": int(tokens), "packing": cfg.packing})
    out = Path(out)
    partial = _partial(out)
    if out.exists() and not overwrite:
        raise AtlasError(f"{out} already exists; pass --overwrite (overwrite=True) or choose another --out")
    if partial.exists() and not overwrite and _partial_is_complete(partial):
        log(f"{partial} is a complete build that was not renamed (interrupted at the very end); finishing it")
        os.replace(partial, out)
        return out
    if partial.exists():
        log(f"removing the unfinished build {partial} left by an interrupted run; starting again")
        _remove_db(partial)
    model, dictionary, dict_path = _load_inputs(model, dictionary, device, dtype)
    hook = hook or dictionary.cfg.hook
    if not hook:
        raise AtlasError(
            "the dictionary does not name its hook (cfg.hook); pass hook= (--hook), e.g. blocks.6.resid_post"
        )
    model.resolve(hook)
    corpus = open_corpus(corpus)
    packer = ContextPacker(model.tokenizer, cfg.packing)
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.time()
    conn = create(partial)
    try:
        acc, cofire, metrics = _stream(model, dictionary, hook, corpus, packer, cfg, conn, progress)
        provenance = {
            "lmscope_version": __version__,
            "schema_version": SCHEMA_VERSION,
            "command": command,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "build_seconds": round(time.time() - started, 2),
            "model": {"spec": model.spec, "class": type(model.hf).__name__, "family": model.family.name,
                      "n_layers": model.n_layers, "d_model": model.d_model, "dtype": str(model.dtype)},
            "model_hash": _model_hash(model),
            "dictionary": {"path": dict_path, "config": dictionary.cfg.to_dict(),
                           "sha256": _dictionary_hash(dictionary),
                           "training": getattr(dictionary, "metadata", {}).get("training", {})},
            "hook": hook,
            "corpus": {"fingerprint": corpus.fingerprint(), "description": corpus.describe(),
                       "stats": vars(corpus.stats)},
            "config": cfg.to_dict(),
        }  # fmt: skip
        from lmscope.atlas.write import write_results

        write_results(conn, model, dictionary, acc, cofire, metrics, provenance, cfg, dict_path, log)
        conn.close()
    except BaseException:
        with contextlib.suppress(Exception):
            conn.close()
        raise
    os.replace(partial, out)
    return out


def _model_hash(model: Model) -> str:
    try:
        from lmscope.harvest import model_fingerprint

        return model_fingerprint(model)
    except Exception:  # pragma: no cover - the harvest package is optional for the atlas
        return ""


def _stream(
    model: Model,
    dictionary: Dictionary,
    hook: str,
    corpus: Corpus,
    packer: ContextPacker,
    cfg: AtlasConfig,
    conn: sqlite3.Connection,
    progress: bool,
) -> tuple[FeatureAccumulator, CofireSample, dict[str, float]]:
    dcfg = dictionary.cfg
    target_hook = dcfg.hook_out if dcfg.is_transcoder and dcfg.hook_out else None
    hooks = [hook] + ([target_hook] if target_hook and target_hook != hook else [])
    dev = model.device
    dictionary = dictionary.to(dev).float().eval()
    acc = FeatureAccumulator(
        dcfg.d_sae, cfg.top_k, cfg.bins, cfg.samples_per_bin, cfg.hist_bins, cfg.window_before,
        cfg.window_after, device=dev, seed=cfg.seed,
    )  # fmt: skip
    cofire = CofireSample(dcfg.d_sae)
    target = math.ceil(cfg.tokens / cfg.context) * cfg.context
    stride = max(1, target // max(1, cfg.cofire_tokens))
    sse = sum_x = sum_x2 = l0 = 0.0
    sum_vec: torch.Tensor | None = None
    n_ctx = 0
    bar = _progress(progress)
    with bar, model.capture(hooks, stop_early=True) as acts, torch.inference_mode():
        task = bar.add_task("atlas", total=target)
        for batch in _contexts(packer, corpus, cfg):
            ids = torch.from_numpy(batch.tokens)
            model(ids)
            x = acts[hook].float()
            if x.shape[-1] != dcfg.d_in:
                raise AtlasError(
                    f"{hook} is {x.shape[-1]} wide but the dictionary expects d_in={dcfg.d_in}; pass the hook the "
                    "dictionary was trained on (--hook)"
                )
            z = dictionary.encode(x)
            special = torch.from_numpy(batch.special).to(dev)
            B, C = ids.shape
            ctx_ids = torch.arange(n_ctx, n_ctx + B, device=dev)
            b, p, f, a = acc.update(z, special, ctx_ids)
            # evaluation metrics on the non-special tokens; the reconstruction is decoded from the sparse firings
            tok = b * C + p
            zs = torch.sparse_coo_tensor(torch.stack([tok, f]), a, (B * C, dcfg.d_sae), check_invariants=False)
            recon = (torch.sparse.mm(zs, dictionary.W_dec) + dictionary.b_dec).reshape(B, C, -1)[~special]
            y = (acts[target_hook] if target_hook else acts[hook]).float()[~special]
            sse += float((recon - y).pow(2).sum())
            sum_x2 += float(y.pow(2).sum())
            sum_x += float(y.shape[0])
            sum_vec = y.sum(0, dtype=torch.float64) if sum_vec is None else sum_vec + y.sum(0, dtype=torch.float64)
            l0 += float(len(f))
            # co-firing sample: every `stride`-th token of the stream that is not special
            flat_idx = torch.arange(n_ctx * C, (n_ctx + B) * C, device=dev).reshape(B, C)
            pick = ((flat_idx % stride == 0) & ~special).reshape(-1)
            if pick.any():
                row_of = torch.cumsum(pick, 0) - 1
                sel = pick[tok]
                cofire.add(row_of[tok[sel]], f[sel], int(pick.sum()))
            conn.executemany(
                "INSERT INTO contexts (id, tokens) VALUES (?, ?)",
                [(n_ctx + i, batch.tokens[i].astype("<i4").tobytes()) for i in range(B)],
            )
            n_ctx += B
            bar.update(task, advance=B * C)
    conn.commit()
    if n_ctx == 0:
        raise AtlasError(
            f"the corpus yielded no complete context of {cfg.context} tokens; use a larger corpus or a smaller "
            "--context"
        )
    n = max(1.0, sum_x)
    total_var = sum_x2 - float((sum_vec if sum_vec is not None else torch.zeros(1)).pow(2).sum()) / n
    n_alive = int((acc.n_fired > 0).sum())
    metrics = {
        "tokens": acc.n_tokens,
        "contexts": n_ctx,
        "fvu": sse / max(total_var, 1e-12),
        "mse": sse / n,
        "l0": l0 / n,
        "dead": dcfg.d_sae - n_alive,
        "dead_fraction": (dcfg.d_sae - n_alive) / dcfg.d_sae,
        "dense": int((acc.n_fired.float() / max(1, acc.n_tokens) > 0.1).sum()),
    }
    return acc, cofire, metrics


def load_eval_metrics(dict_path: str | None) -> dict[str, Any]:
    """Evaluation results saved next to the dictionary (eval.json / metrics.json), if any."""
    if not dict_path:
        return {}
    out: dict[str, Any] = {}
    for name in ("eval.json", "evaluation.json", "metrics.json"):
        p = Path(dict_path) / name
        if p.is_file():
            with contextlib.suppress(json.JSONDecodeError, OSError):
                out[name] = json.loads(p.read_text())
    return out


__all__ = ["AtlasConfig", "build_atlas", "get_meta", "set_meta"]
