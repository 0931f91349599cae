"""Where lmscope keeps files it derives and can always make again (converted models, compiled kernels)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """$LMSCOPE_CACHE, default ~/.cache/lmscope."""
    return Path(os.environ.get("LMSCOPE_CACHE", Path.home() / ".cache" / "lmscope"))
