"""What the explorer's routes share: the limits on server work, `Live` (the model and dictionary that the
inspector and the steering panel run), and the accessors of the app's state.

`lmscope.web.app.create_app` is the only place that assembles the app and installs this state (`install`); the
route modules (api, pages, labels_api, steer_api, graph_api, diff_api) read it through the accessors and import
nothing from app.py.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import torch
from fastapi import FastAPI, HTTPException, Request
from pydantic import AfterValidator, BeforeValidator

from lmscope.atlas.store import AtlasStore
from lmscope.corpora import special_token_ids
from lmscope.dictionaries.base import Dictionary
from lmscope.errors import LmscopeError
from lmscope.model.adapter import Model

MAX_INSPECT_CHARS = 2000  # characters of a prompt the inspector accepts
MAX_FEATURES_PER_TOKEN = 8  # features the inspector shows per token
MAX_STEER_CHARS = 2000  # characters of a prompt the steering panel accepts
MAX_STEER_TOKENS = 64  # new tokens per steered generation
MAX_STRENGTH = 1e6  # the largest steering strength, either sign


def _blank_is_none(v: Any) -> Any:
    return None if isinstance(v, str) and not v.strip() else v


def _finite(v: float | None) -> float | None:
    if v is not None and not math.isfinite(v):
        raise ValueError("must be a finite number")
    return v


# A number in a query string that may be left empty: an empty box of a GET form is "not set" (None), not an error;
# nan and inf are refused.
OptionalNumber = Annotated[float | None, BeforeValidator(_blank_is_none), AfterValidator(_finite)]


def search_text(q: str | None, required: bool = False) -> str | None:
    """A search query as the routes take it: None when blank (no query; HTTP 422 instead when `required`), and
    HTTP 422 when it holds a NUL character, which no text in an atlas does."""
    if q is not None and "\x00" in q:
        raise HTTPException(422, "the search text contains a NUL character (%00); remove it")
    if q is None or not q.strip():
        if required:
            raise HTTPException(422, "the search text is blank; type a word, a phrase or some code to search for")
        return None
    return q


@dataclass
class Live:
    """A model and dictionary that the prompt inspector and the steering panel run on demand (one request at a
    time: `lock` guards the model; `steer_lock` turns away a second steering request while one runs)."""

    model: Model
    dictionary: Dictionary
    hook: str | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    steer_lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.hook = self.hook or self.dictionary.cfg.hook
        if not self.hook:
            raise LmscopeError("the dictionary names no hook; pass hook= to Live")
        self.model.resolve(self.hook)
        self.dictionary = self.dictionary.to(self.model.device).float().eval()

    def inspect(self, text: str, top: int = MAX_FEATURES_PER_TOKEN, feature: int | None = None) -> list[dict[str, Any]]:
        """Per token of `text` (BOS first, as in the atlas contexts): the `top` strongest features that fire,
        strongest first; `n_active`, how many fire in all; `special`, whether it is a special token (BOS/EOS/pad),
        which the atlas leaves out of its statistics; with `feature`, `focus`: that feature's activation there."""
        hook = self.hook
        assert hook is not None  # __post_init__ set it
        tok = self.model.tokenizer
        ids = tok(text, add_special_tokens=False)["input_ids"]
        if tok.bos_token_id is not None:
            ids = [tok.bos_token_id, *ids]
        special = set(special_token_ids(tok))
        with self.lock, self.model.capture([hook]) as acts, torch.inference_mode():
            self.model(torch.tensor([ids]))
            z = self.dictionary.encode(acts[hook].float())[0]
        k = min(top, z.shape[-1])
        vals, idx = z.topk(k, dim=-1)
        n_active = (z > 0).sum(-1).tolist()
        out = []
        for i, t in enumerate(ids):
            feats = [{"id": int(f), "act": float(v)} for v, f in zip(vals[i].tolist(), idx[i].tolist(), strict=True)
                     if v > 0]  # fmt: skip
            row = {"token": tok.decode([t]), "token_id": int(t), "special": int(t) in special,
                   "n_active": int(n_active[i]), "features": feats}  # fmt: skip
            if feature is not None:
                row["focus"] = float(z[i, feature])
            out.append(row)
        return out


def load_live(
    atlas: str | Path, model: str | None = None, dict_dir: str | Path | None = None, device: str = "auto",
    dtype: str = "auto",
) -> tuple[Live | None, str]:  # fmt: skip
    """Load the atlas's model and dictionary (or the given ones) for the inspector; (None, why) if impossible."""
    from lmscope.dictionaries.pretrained import open_dictionary
    from lmscope.model.loading import load_model

    store = AtlasStore(atlas)
    prov = store.provenance
    spec = model or prov.get("model", {}).get("spec")
    path = dict_dir or prov.get("dictionary", {}).get("path")
    if not spec or not path:
        return None, "the atlas does not record where its model or dictionary is; pass --model and --dict"
    if store.is_crosscoder:
        return None, (
            "this atlas is a crosscoder's over two models; the prompt inspector and steering run one model "
            "and one dictionary, so they are off (browse and search its latents, or use `lmscope diff`)"
        )
    try:
        d = open_dictionary(path, hook=prov.get("hook"))  # any format lmscope reads, at the atlas's hook
        m = load_model(spec, device=device, dtype=dtype)
        return Live(m, d, hook=prov.get("hook")), f"inspector runs {spec} with {path}"
    except (LmscopeError, OSError) as exc:
        return None, f"the prompt inspector is off: cannot load the model or dictionary ({exc})"


def install(
    app: FastAPI, store: AtlasStore, live: Live | None, live_note: str | None, read_only: bool,
    graphs: Path | None = None, diffs: Path | None = None,
) -> None:  # fmt: skip
    """Put the explorer's state on `app` (create_app does this once); `graphs` is the directory of attribution-graph
    JSON files that the graph view serves (None: the graph view is off); `diffs`, the directory of model-diff
    reports that the diff view serves (None: the diff view is off)."""
    app.state.store = store
    app.state.live = live
    app.state.live_note = live_note or ("inspector ready" if live else "no model loaded: the prompt inspector is off")
    app.state.read_only = read_only
    app.state.graphs_dir = graphs
    app.state.diffs_dir = diffs


def store_of(request: Request) -> AtlasStore:
    """The atlas the app serves (read-only)."""
    store: AtlasStore = request.app.state.store
    return store


def live_of(request: Request) -> Live | None:
    """The live model and dictionary, or None when the inspector and steering are off."""
    live: Live | None = request.app.state.live
    return live


def live_note(request: Request) -> str:
    """Why the inspector is on or off, in words."""
    return str(request.app.state.live_note)


def is_read_only(request: Request) -> bool:
    """Whether the routes that write (human labels, supernodes of a graph) are turned off."""
    return bool(getattr(request.app.state, "read_only", False))


def graphs_dir(request: Request) -> Path | None:
    """The directory of attribution-graph JSON files the graph view serves, or None when it is off."""
    d: Path | None = getattr(request.app.state, "graphs_dir", None)
    return d


def diffs_dir(request: Request) -> Path | None:
    """The directory of model-diff reports (one subdirectory with a report.json each) the diff view serves, or None
    when it is off."""
    d: Path | None = getattr(request.app.state, "diffs_dir", None)
    return d
