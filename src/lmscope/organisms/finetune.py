"""Full fine-tuning of a causal LM on (user, assistant) examples, in float32, with checkpoints and exact resume.

The loss is next-token cross-entropy on the assistant's tokens only (the prompt is context). Batches follow a
seeded order fixed in advance, so step s always sees the same examples; a resume state (weights, AdamW moments,
step) is written atomically at every checkpoint, and a run killed at any moment continues from the last one to
the same final weights as an uninterrupted run. Checkpoints are loadable model directories
(`checkpoints/step-000030/`), for `lmscope diff --series`.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lmscope.core.atomic import atomic_write_text
from lmscope.core.progress import ProgressCallback, ProgressEvent
from lmscope.errors import OrganismError
from lmscope.model.adapter import Model
from lmscope.model.loading import save_model_files
from lmscope.organisms.prompts import chat_prompt, end_of_turn
from lmscope.organisms.recipes import Example
from lmscope.training.checkpoint import load_checkpoint, load_optimizer_state, optimizer_state, save_checkpoint

RESUME = "resume.safetensors"


@dataclass(frozen=True)
class FinetuneConfig:
    steps: int
    batch_size: int = 8
    lr: float = 5e-5
    warmup_steps: int = 10
    checkpoints: int = 10
    max_len: int = 96
    seed: int = 0
    min_lr_frac: float = 0.1


def tokenize(model: Model, examples: Sequence[Example], max_len: int) -> list[tuple[list[int], int]]:
    """(token ids, index of the first answer token) per example; the prompt is cut from the left if too long."""
    tok = model.tokenizer
    eot = end_of_turn(tok)
    out = []
    for e in examples:
        p = tok(chat_prompt(tok, e.user), add_special_tokens=False)["input_ids"]
        a = tok(e.assistant + eot, add_special_tokens=False)["input_ids"][: max_len - 1]
        p = p[-(max_len - len(a)) :]
        out.append((p + a, len(p)))
    return out


def batch_order(n: int, steps: int, batch_size: int, seed: int) -> list[list[int]]:
    """The examples of every step: seeded epochs over range(n), fixed before training starts."""
    rng = random.Random(seed)
    flat: list[int] = []
    while len(flat) < steps * batch_size:
        perm = list(range(n))
        rng.shuffle(perm)
        flat += perm
    return [flat[s * batch_size : (s + 1) * batch_size] for s in range(steps)]


def _collate(rows: list[tuple[list[int], int]], pad: int) -> tuple[Tensor, Tensor, Tensor]:
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (r, start) in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
        labels[i, start : len(r)] = torch.tensor(r[start:])
    return ids, mask, labels


def lr_at(step: int, cfg: FinetuneConfig) -> float:
    """Linear warmup, then cosine decay to min_lr_frac of the peak."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * t)))


def checkpoint_steps(cfg: FinetuneConfig) -> list[int]:
    return (
        sorted({round(k * cfg.steps / cfg.checkpoints) for k in range(1, cfg.checkpoints + 1)})
        if cfg.checkpoints
        else []
    )


def finetune(
    model: Model,
    examples: Sequence[Example],
    cfg: FinetuneConfig,
    out: Path,
    progress: ProgressCallback | None = None,
) -> dict[str, Any]:
    """Fine-tune `model` in place; returns {steps, tokens, seconds, tokens_per_s, loss_first, loss_last}."""
    hf = model.hf
    if any(p.dtype != torch.float32 for p in hf.parameters()):
        raise OrganismError("organisms are fine-tuned in float32 (load the base with --dtype float32)")
    if not examples:
        raise OrganismError("no training examples")
    rows = tokenize(model, examples, cfg.max_len)
    order = batch_order(len(rows), cfg.steps, cfg.batch_size, cfg.seed)
    tok = model.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    params = dict(hf.named_parameters())
    opt = torch.optim.AdamW(params.values(), lr=cfg.lr, weight_decay=0.0)
    saves = set(checkpoint_steps(cfg))
    log_path = out / "training.jsonl"
    start, history = 0, []
    resume = out / RESUME
    if resume.is_file():
        tensors, meta = load_checkpoint(resume)
        if meta.get("config") != cfg.__dict__ or meta.get("n_examples") != len(rows):
            raise OrganismError(
                f"{resume} was written by a different recipe ({meta.get('config')}); delete {out} to start over"
            )
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(tensors[f"param.{name}"])
        load_optimizer_state(opt, tensors, "adam", meta["groups"])
        start, history = int(meta["step"]), list(meta["history"])
    hf.eval()  # no dropout: a step's update depends on its examples only
    tokens = sum(history_row["tokens"] for history_row in history)
    t0 = time.perf_counter()
    if progress:
        progress(ProgressEvent("fine-tune", start, cfg.steps, "steps"))
    for step in range(start, cfg.steps):
        ids, mask, labels = _collate([rows[i] for i in order[step]], pad)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        logits = hf(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).logits.float()
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1).to(model.device), ignore_index=-100
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
        opt.step()
        n_tok = int(mask.sum())
        loss_value = float(loss.detach())
        tokens += n_tok
        history.append({"step": step + 1, "loss": round(loss_value, 5), "tokens": n_tok})
        if progress:
            progress(ProgressEvent("fine-tune", step + 1, cfg.steps, "steps", f"loss {loss_value:.3f}",
                                   info={"loss": loss_value}))  # fmt: skip
        if step + 1 in saves:
            ck = out / "checkpoints" / f"step-{step + 1:06d}"
            if ck.exists():
                shutil.rmtree(ck)
            save_model_files(hf, tok, ck)
            adam, groups = optimizer_state(opt, "adam")
            meta = {"step": step + 1, "history": history, "groups": groups, "config": cfg.__dict__,
                    "n_examples": len(rows)}  # fmt: skip
            save_checkpoint(resume, {**{f"param.{n}": p.detach() for n, p in params.items()}, **adam}, meta)
    secs = time.perf_counter() - t0
    atomic_write_text(log_path, "".join(json.dumps(h) + "\n" for h in history))
    if progress:
        progress(ProgressEvent("fine-tune", cfg.steps, cfg.steps, "steps", finished=True))
    ran = sum(h["tokens"] for h in history[start:])
    return {
        "steps": cfg.steps,
        "tokens": tokens,
        "seconds_this_run": round(secs, 2),
        "tokens_per_s": round(ran / secs, 1) if secs > 0 and ran else None,
        "loss_first": history[0]["loss"],
        "loss_last": history[-1]["loss"],
    }
