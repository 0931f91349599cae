"""Errors that lmscope raises on bad input. Each message names the problem and the fix."""

from __future__ import annotations


class LmscopeError(Exception):
    """Base class: the CLI prints these as one clean message, never as a traceback."""


class ModelLoadError(LmscopeError):
    """A model spec could not be resolved or loaded."""


class HookError(LmscopeError):
    """An unknown, unsupported or misused hook point."""


class CircuitError(LmscopeError):
    """An attribution graph cannot be built or read as asked (prompt, targets, transcoders, family)."""


class OrganismError(LmscopeError):
    """A model organism cannot be made or read as asked (recipe, base model, directory, ground truth)."""


class DiffError(LmscopeError):
    """Two models cannot be compared as asked (tokenizers, widths, facts file, crosscoder, report)."""


class AuditError(LmscopeError):
    """An audit cannot run as asked (battery file, battery too small, reference model, report)."""


class MatchError(LmscopeError):
    """Two dictionaries cannot be matched as asked (widths, hooks, models, corpus, report)."""
