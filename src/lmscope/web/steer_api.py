"""Steering from the feature page: POST /api/features/{id}/steer generates a baseline and a steered
continuation of a prompt with one latent edit on the feature (error term kept, see lmscope.steer.edits), and
measures the feature's activation on both continuations.

It needs the live model and dictionary (`Live` in web/state.py); without them it answers 503 with the reason.
Server work is capped: one steering request at a time (a second one while it runs answers 429), at most
`MAX_STEER_TOKENS` new tokens, prompts of at most `MAX_STEER_CHARS` characters.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from fastapi import APIRouter, HTTPException, Request
from pydantic import BaseModel, Field

from lmscope.errors import LmscopeError
from lmscope.web.state import MAX_STEER_CHARS, MAX_STEER_TOKENS, MAX_STRENGTH, live_note, live_of, store_of

router = APIRouter(prefix="/api", tags=["steering"])

__all__ = ["MAX_STEER_CHARS", "MAX_STEER_TOKENS", "MAX_STRENGTH", "SteerRequest", "SteerResponse", "router"]


class SteerRequest(BaseModel):
    prompt: str = Field(min_length=1, max_length=MAX_STEER_CHARS, description="the text to continue")
    mode: Literal["add", "clamp", "ablate"] = Field(
        "add", description="add: + strength x the decoder direction; clamp: set the activation to strength; "
        "ablate: set it to 0 (strength ignored)",
    )  # fmt: skip
    strength: float = Field(4.0, allow_inf_nan=False, ge=-MAX_STRENGTH, le=MAX_STRENGTH)
    max_new_tokens: int = Field(24, ge=1, le=MAX_STEER_TOKENS)
    seed: int = Field(0, ge=0, le=2**31 - 1)


class SteerMeasure(BaseModel):
    activation_baseline: float | None = Field(None, description="the feature's mean activation on the baseline "
                                              "continuation (clean forward pass)")  # fmt: skip
    activation_steered: float | None = Field(None, description="the same on the steered continuation")
    kl_first_position: float | None = Field(None, description="KL(steered || baseline), first new token")
    perplexity_baseline: float | None = None
    perplexity_steered: float | None = Field(None, description="of the steered text under the unsteered model")


class SteerResponse(BaseModel):
    feature: int
    model: str
    hook: str
    edit: str = Field(description="the edit as `lmscope steer --feature` writes it")
    prompt: str
    seed: int
    max_new_tokens: int
    baseline: str
    steered: str
    measure: SteerMeasure


def _finite(x: Any) -> float | None:
    return float(x) if isinstance(x, int | float) and math.isfinite(x) else None


@router.post(
    "/features/{fid}/steer",
    response_model=SteerResponse,
    responses={
        400: {"description": "the dictionary cannot steer"}, 404: {"description": "no such feature"},
        429: {"description": "another steering request is running"}, 503: {"description": "no model loaded"},
    },
)  # fmt: skip
def steer_feature(request: Request, fid: int, body: SteerRequest) -> dict[str, Any]:
    """Continue `prompt` with and without an edit on feature `fid` (same seed); the feature's activation read
    back on both continuations, the KL at the first new token and the perplexities."""
    from lmscope.model.generation import SamplingConfig, prompt_ids
    from lmscope.steer.edits import Edit, check_dictionary, feature_readout, latent_edit_writer
    from lmscope.steer.measure import run_steering

    store = store_of(request)
    if not 0 <= fid < store.n_features:
        raise HTTPException(404, f"feature {fid} does not exist; ids run from 0 to {store.n_features - 1}")
    live = live_of(request)
    if live is None:
        raise HTTPException(503, f"steering is not available: {live_note(request)}")
    if not body.prompt.strip():
        raise HTTPException(422, "the prompt is empty; type some text for the model to continue")
    edit = Edit(fid, body.mode, 0.0 if body.mode == "ablate" else body.strength)
    label = f"{fid}=ablate" if body.mode == "ablate" else f"{fid}={body.mode}:{body.strength:g}"
    if not live.steer_lock.acquire(blocking=False):
        raise HTTPException(429, "another steering request is running; try again when it has finished")
    try:
        with live.lock:  # the model's hooks are shared with the inspector: one run at a time
            try:
                hook = check_dictionary(live.model, live.dictionary, live.hook)
                writer = latent_edit_writer(live.dictionary, [edit])
            except LmscopeError as exc:
                raise HTTPException(400, f"cannot steer with this dictionary: {exc}") from None
            ids = prompt_ids(live.model, body.prompt)
            with torch.no_grad():
                result = run_steering(
                    live.model, {hook: writer}, body.prompt, ids, [label],
                    SamplingConfig(max_new_tokens=body.max_new_tokens, temperature=0.8, greedy=False),
                    samples=1, seed=body.seed, readout=feature_readout(live.dictionary, hook, [fid]),
                )  # fmt: skip
    finally:
        live.steer_lock.release()
    m = result.measure or {}
    key = f"feature {fid}"
    sample = result.samples[0]
    return {
        "feature": fid, "model": live.model.spec, "hook": hook, "edit": label, "prompt": body.prompt,
        "seed": body.seed, "max_new_tokens": body.max_new_tokens, "baseline": sample.baseline,
        "steered": sample.steered,
        "measure": {
            "activation_baseline": _finite(m.get("activation_baseline", {}).get(key)),
            "activation_steered": _finite(m.get("activation_steered", {}).get(key)),
            "kl_first_position": _finite(m.get("kl_first_position")),
            "perplexity_baseline": _finite(m.get("perplexity_baseline")),
            "perplexity_steered": _finite(m.get("perplexity_steered")),
        },
    }  # fmt: skip
