"""Errors of the synthetic layer: a toy or ground-truth configuration that cannot run, named with its fix."""

from __future__ import annotations

from lmscope.errors import LmscopeError


class SyntheticError(LmscopeError):
    """Base class of the synthetic layer's bad-input errors."""


class ToyConfigError(SyntheticError):
    """A toy-model configuration is out of range."""


class GroundTruthError(SyntheticError):
    """A ground-truth benchmark configuration cannot be generated."""
