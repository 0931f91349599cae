"""What a model represents where it decides: every layer's residual stream at the last token of a battery text.

A text is the model's chat template with the user turn and, when given, the start of its own answer; the
activation is read at its final token (where the model is about to answer, or has just said the answer that
carries the concept). Texts run in batches sorted by length, right-padded with an attention mask, so padding
never reaches a real token; the next-token log-probabilities at that position come back too (for reading what
the model says).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import numpy as np
import torch

from lmscope.audit.batteries import Text
from lmscope.model.adapter import Model
from lmscope.organisms.prompts import chat_prompt


def render(model: Model, t: Text) -> str:
    return chat_prompt(model.tokenizer, t.user) + t.assistant


def resid_hooks(model: Model) -> list[str]:
    return [f"blocks.{i}.resid_post" for i in range(model.n_layers)]


@torch.no_grad()
def last_token_states(
    model: Model,
    texts: Sequence[Text],
    batch_size: int = 16,
    want_logits: bool = False,
    edit: dict[str, Callable[..., torch.Tensor]] | None = None,
    layers: Sequence[int] | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """([n, n_layers, d] float32 residuals after every block (or only `layers`, in that order) at each text's last
    token, and [n, vocab] log-probabilities there when `want_logits`). `edit`: activation writers applied during
    the forward (model.intervene), e.g. a steering vector."""
    tok = model.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ids = [model.encode(render(model, t), add_special_tokens=False)[0] for t in texts]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    hooks = resid_hooks(model) if layers is None else [f"blocks.{i}.resid_post" for i in layers]
    out = np.zeros((len(ids), len(hooks), model.d_model), dtype=np.float32)
    logps = np.zeros((len(ids), model.vocab_size), dtype=np.float32) if want_logits else None
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        T = max(len(ids[i]) for i in idx)
        x = torch.full((len(idx), T), int(pad), dtype=torch.long)
        mask = torch.zeros((len(idx), T), dtype=torch.long)
        for r, i in enumerate(idx):
            x[r, : len(ids[i])] = ids[i]
            mask[r, : len(ids[i])] = 1
        last = mask.sum(1) - 1
        rows = torch.arange(len(idx))
        editing = model.intervene(edit) if edit else contextlib.nullcontext()
        with model.capture(hooks, stop_early=not want_logits) as acts, editing:
            logits = model(x.to(model.device), mask.to(model.device))
        stacked = torch.stack([acts[h][rows, last.to(acts[h].device)].float().cpu() for h in hooks], dim=1)
        out[idx] = stacked.numpy()
        if logps is not None and logits is not None:
            logps[idx] = logits[rows, last.to(logits.device)].float().log_softmax(-1).cpu().numpy()
    return out, logps
