"""Steering: latent edits with the error term kept (`edits`) and their measurement (`measure`)."""

from lmscope.steer.edits import Edit, latent_edit_writer, steer
from lmscope.steer.measure import run_steering, token_rate

__all__ = ["Edit", "latent_edit_writer", "run_steering", "steer", "token_rate"]
