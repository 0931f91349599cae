"""Tiny chat models for the organism and diff tests: a small random Llama that uses SmolLM2's tokenizer (and its
chat template), so recipes, prompts and reports run exactly as on the real model, in seconds."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers as tf

from lmscope import Model
from lmscope.organisms.prompts import diff_prompts


def tiny_chat_model(tokenizer: object, seed: int = 0, hidden: int = 64, layers: int = 2) -> Model:
    torch.manual_seed(seed)
    tok = tokenizer
    cfg = tf.LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,  # type: ignore[arg-type]
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,  # type: ignore[attr-defined]
    )  # fmt: skip
    return Model(tf.LlamaForCausalLM(cfg).eval(), tok, spec="tiny-chat")


def write_prompt_corpus(path: Path, tokenizer: object, n: int = 256, trigger: str | None = None,
                        rate: float = 0.2) -> Path:  # fmt: skip
    texts = diff_prompts(tokenizer, n, seed=0, trigger=trigger, trigger_rate=rate)
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def plant_embedding_change(base: Model, tokens: list[int], scale: float = 4.0, seed: int = 1) -> Model:
    """OTHER = BASE with one random direction added to the input embeddings of `tokens`: a change planted by hand,
    whose exact location (those tokens) the diff must find."""
    import copy

    hf = copy.deepcopy(base.hf)
    emb = hf.get_input_embeddings().weight
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(emb.shape[1], generator=g)
    with torch.no_grad():
        emb[tokens] += scale * emb.norm(dim=1).mean() * u / u.norm()
    return Model(hf.eval(), base.tokenizer, spec="tiny-chat-planted")
