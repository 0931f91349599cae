"""Old import paths (lmscope 0.1's flat modules) keep working for one release, with a DeprecationWarning.

`import lmscope.store` or `from lmscope.harvest import harvest` still work: a meta-path finder maps each old
name to the module that now holds its code (see `MOVED`) and returns that very module object, so monkeypatching
through an old path patches the real module. No shim files are kept in the tree. Removed in lmscope 0.3.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
from types import ModuleType

# old module path -> new module path
MOVED: dict[str, str] = {
    "lmscope.hook_maps": "lmscope.model.families",
    "lmscope.hooks": "lmscope.model.hooks",
    "lmscope.interventions": "lmscope.model.interventions",
    "lmscope.loading": "lmscope.model.loading",
    "lmscope.generation": "lmscope.model.generation",
    "lmscope.device": "lmscope.model.device",
    "lmscope.harvest": "lmscope.activations",
    "lmscope.harvest.format": "lmscope.activations.format",
    "lmscope.harvest.job": "lmscope.activations.harvest",
    "lmscope.store": "lmscope.activations.store",
    "lmscope.evaluate": "lmscope.training.evaluate",
    "lmscope.steering": "lmscope.steer.edits",
    "lmscope.steering_measure": "lmscope.steer.measure",
    "lmscope.pipeline": "lmscope.workflows.pipeline",
    "lmscope.demo": "lmscope.workflows.demo",
    "lmscope.atomic": "lmscope.core.atomic",
    "lmscope.checksums": "lmscope.core.checksums",
}
REMOVED_IN = "0.3"


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, old: str, new: str) -> None:
        self.old, self.new = old, new

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        warnings.warn(
            f"{self.old} moved to {self.new}; the old path is deprecated and goes away in lmscope {REMOVED_IN}",
            DeprecationWarning,
            stacklevel=2,
        )
        return importlib.import_module(self.new)

    def exec_module(self, module: ModuleType) -> None:
        # The module is the new one, already executed; the import system would otherwise overwrite its
        # __spec__/__loader__ with ours, so put them back.
        real = importlib.import_module(self.new)
        module.__spec__ = real.__spec__
        module.__loader__ = real.__loader__


class _MovedFinder(importlib.abc.MetaPathFinder):
    def find_spec(
        self, fullname: str, path: object = None, target: object = None
    ) -> importlib.machinery.ModuleSpec | None:
        new = MOVED.get(fullname)
        if new is None:
            return None
        is_pkg = any(k.startswith(fullname + ".") for k in MOVED)
        return importlib.machinery.ModuleSpec(fullname, _AliasLoader(fullname, new), is_package=is_pkg)


def install() -> None:
    """Put the finder first on `sys.meta_path`, once (idempotent)."""
    if not any(isinstance(f, _MovedFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _MovedFinder())  # first: a moved package's __path__ would load copies
