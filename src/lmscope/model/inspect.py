"""Looking at a model without changing it: the shape of every hook point, and the most likely next tokens."""

from __future__ import annotations

import torch

from lmscope.model.adapter import Model


def hook_shapes(model: Model, n_tokens: int = 4) -> dict[str, tuple[int, ...]]:
    """Shapes of every hook point, measured by one short forward pass (batch 1)."""
    ids = torch.arange(n_tokens).unsqueeze(0) % model.vocab_size
    with model.capture(model.hook_names(), stop_early=False) as acts:
        model(ids)
    return {name: tuple(acts[name].shape) for name in model.hook_names()}


def predict_next(model: Model, text: str, top: int = 10) -> list[tuple[str, float]]:
    """The `top` most likely next tokens after `text`, decoded, with their probabilities (most likely first)."""
    ids = model.encode(text)
    logits = model(ids)
    assert logits is not None
    probs = logits[0, -1].float().softmax(-1)
    values, indices = probs.topk(top)
    return [(model.tokenizer.decode([int(i)]), float(v)) for v, i in zip(values, indices, strict=True)]
