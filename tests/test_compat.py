"""lmscope 0.1's flat import paths keep working for one release, warn, and give the very same module objects."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

import lmscope
from lmscope._compat import MOVED


def test_every_old_path_warns_and_is_the_new_module() -> None:
    # a fresh interpreter, so each warning comes from the import itself and not from sys.modules
    code = (
        "import importlib, warnings\n"
        "import lmscope\n"
        "from lmscope._compat import MOVED\n"
        "for old, new in sorted(MOVED.items()):\n"
        "    with warnings.catch_warnings(record=True) as seen:\n"
        "        warnings.simplefilter('always')\n"
        "        mod = importlib.import_module(old)\n"
        "    said = [str(w.message) for w in seen if issubclass(w.category, DeprecationWarning)]\n"
        "    ok = mod is importlib.import_module(new) and any(s.startswith(f'{old} moved to {new};') for s in said)\n"
        "    print(old, ok)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    results = dict(line.split() for line in out.splitlines())
    assert sorted(results) == sorted(MOVED)
    assert all(v == "True" for v in results.values()), results


def test_old_from_imports_and_monkeypatching_reach_the_real_module(monkeypatch: pytest.MonkeyPatch) -> None:
    for old in ("lmscope.harvest", "lmscope.atomic"):
        monkeypatch.delitem(sys.modules, old, raising=False)
    with pytest.warns(DeprecationWarning):
        from lmscope.harvest import HarvestConfig, harvest  # the old package path
    with pytest.warns(DeprecationWarning):
        import lmscope.atomic as old_atomic
    from lmscope.activations import HarvestConfig as New
    from lmscope.activations import harvest as new_harvest
    from lmscope.core import atomic

    assert HarvestConfig is New and harvest is new_harvest
    monkeypatch.setattr(old_atomic, "atomic_open", "patched")
    assert atomic.atomic_open == "patched"


def test_new_paths_do_not_warn() -> None:
    code = (
        "import warnings\nwarnings.simplefilter('error')\n"
        "import lmscope, lmscope.activations, lmscope.model, lmscope.steer, lmscope.workflows.demo, lmscope.cli.app\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_facade_still_exports_the_model_layer() -> None:
    assert lmscope.Model is importlib.import_module("lmscope.model.adapter").Model
    assert lmscope.interventions is importlib.import_module("lmscope.model.interventions")
