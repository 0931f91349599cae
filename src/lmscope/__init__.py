"""lmscope: an MRI scanner for language models.

The package is a stack of layers, each a sub-package (docs/architecture.md):
core → model → corpora / activations → dictionaries / training → atlas → explain, steer → workflows → cli, web.
Imports point down the stack only; `tests/test_layers.py` checks it.
"""

from lmscope import _compat
from lmscope._version import __version__
from lmscope.errors import HookError, LmscopeError, ModelLoadError
from lmscope.model import Activations, HookPoint, Model, interventions, load_model

_compat.install()

__all__ = [
    "Activations",
    "HookError",
    "HookPoint",
    "LmscopeError",
    "Model",
    "ModelLoadError",
    "__version__",
    "interventions",
    "load_model",
]
