"""What the explorer's routes share: the limits on server work, `Live` (the model and dictionary that the
inspector and the steering panel run), and the accessors of the app's state.

`lmscope.web.app.create_app` is the only place that assembles the app and installs this state (`install`); the
route modules (api, pages, labels_api, steer_api) read it through the accessors and import nothing from app.py.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request

from lmscope.atlas.store import AtlasStore
from lmscope.dictionaries.base import Dictionary
from lmscope.errors import LmscopeError
from lmscope.model.adapter import Model

MAX_INSPECT_CHARS = 2000  # characters of a prompt the inspector accepts
MAX_FEATURES_PER_TOKEN = 8  # features the inspector shows per token
MAX_STEER_CHARS = 2000  # characters of a prompt the steering panel accepts
MAX_STEER_TOKENS = 64  # new tokens per steered generation
MAX_STRENGTH = 1e6  # the largest steering strength, either sign


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

    def inspect(self, text: str, top: int = MAX_FEATURES_PER_TOKEN) -> list[dict[str, Any]]:
        """Per token of `text` (BOS first, as in the atlas contexts): the features that fire, strongest first."""
        hook = self.hook
        assert hook is not None  # __post_init__ set it
        tok = self.model.tokenizer
        ids = tok(text, add_special_tokens=False)["input_ids"]
        if tok.bos_token_id is not None:
            ids = [tok.bos_token_id, *ids]
        with self.lock, self.model.capture([hook]) as acts, torch.inference_mode():
            self.model(torch.tensor([ids]))
            z = self.dictionary.encode(acts[hook].float())[0]
        k = min(top, z.shape[-1])
        vals, idx = z.topk(k, dim=-1)
        out = []
        for i, t in enumerate(ids):
            feats = [{"id": int(f), "act": float(v)} for v, f in zip(vals[i].tolist(), idx[i].tolist(), strict=True)
                     if v > 0]  # fmt: skip
            out.append({"token": tok.decode([t]), "token_id": int(t), "features": feats})
        return out


def load_live(
    atlas: str | Path, model: str | None = None, dict_dir: str | Path | None = None, device: str = "auto",
    dtype: str = "auto",
) -> tuple[Live | None, str]:  # fmt: skip
    """Load the atlas's model and dictionary (or the given ones) for the inspector; (None, why) if impossible."""
    from lmscope.dictionaries.formats import load_dictionary
    from lmscope.model.loading import load_model

    store = AtlasStore(atlas)
    prov = store.provenance
    spec = model or prov.get("model", {}).get("spec")
    path = dict_dir or prov.get("dictionary", {}).get("path")
    if not spec or not path:
        return None, "the atlas does not record where its model or dictionary is; pass --model and --dict"
    try:
        d = load_dictionary(path)
        m = load_model(spec, device=device, dtype=dtype)
        return Live(m, d, hook=prov.get("hook")), f"inspector runs {spec} with {path}"
    except (LmscopeError, OSError) as exc:
        return None, f"the prompt inspector is off: cannot load the model or dictionary ({exc})"


def install(app: FastAPI, store: AtlasStore, live: Live | None, live_note: str | None, read_only: bool) -> None:
    """Put the explorer's state on `app` (create_app does this once)."""
    app.state.store = store
    app.state.live = live
    app.state.live_note = live_note or ("inspector ready" if live else "no model loaded: the prompt inspector is off")
    app.state.read_only = read_only


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
    """Whether the routes that write human labels are turned off."""
    return bool(getattr(request.app.state, "read_only", False))
