"""lmscope: an MRI scanner for language models."""

from lmscope import interventions
from lmscope.errors import HookError, LmscopeError, ModelLoadError
from lmscope.loading import load_model
from lmscope.model import Activations, HookPoint, Model

__version__ = "0.1.0"

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
