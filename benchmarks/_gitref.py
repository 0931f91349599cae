"""A module of the repository as it was at a git revision, imported on its own (for A/B benchmarks)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent


def module_at(ref: str, path: str, name: str = "ref_module") -> Any:
    """The file `path` (relative to the repository root) at revision `ref`, imported as module `name`. Its own imports
    resolve against the working tree."""
    src = subprocess.run(["git", "show", f"{ref}:{path}"], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    f = Path(tempfile.mkdtemp()) / f"{name}.py"
    f.write_text(src)
    spec = importlib.util.spec_from_file_location(name, f)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod
