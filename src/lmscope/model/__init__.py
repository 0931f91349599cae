"""The model adapter: loading an unmodified HF model, named hook points, capture and intervention, generation."""

from lmscope.model import interventions
from lmscope.model.adapter import Activations, HookPoint, Model
from lmscope.model.device import resolve_device, resolve_dtype
from lmscope.model.loading import load_model

__all__ = ["Activations", "HookPoint", "Model", "interventions", "load_model", "resolve_device", "resolve_dtype"]
