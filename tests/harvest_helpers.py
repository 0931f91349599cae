"""Tiny offline models, tokenizers and corpora for the corpus, harvest and store tests."""

from __future__ import annotations

import random
from pathlib import Path

import torch

import lmscope

WORDS = [
    "the",
    "a",
    "model",
    "layer",
    "token",
    "feature",
    "residual",
    "stream",
    "attention",
    "head",
    "neuron",
    "sparse",
    "dictionary",
    "atlas",
    "scan",
    "python",
    "def",
    "return",
    "class",
    "import",
    "value",
    "list",
    "dict",
    "for",
    "while",
    "if",
    "else",
    "print",
    "data",
    "corpus",
    "shard",
]


def make_text(seed: int, n_words: int) -> str:
    rng = random.Random(seed)
    lines, line = [], []
    for _ in range(n_words):
        line.append(rng.choice(WORDS))
        if len(line) >= rng.randint(4, 12):
            lines.append(" ".join(line))
            line = []
    return "\n".join([*lines, " ".join(line)]).strip() + "\n"


def make_corpus_dir(root: Path, n_docs: int = 12, words: int = 120, seed: int = 0) -> Path:
    """A directory of `n_docs` deterministic text files of varying length."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        (root / f"doc_{i:03d}.txt").write_text(make_text(seed + i, words + 37 * (i % 5)))
    return root


def make_tiny_model_dir(path: Path, layers: int = 2, hidden: int = 32, seed: int = 0) -> Path:
    """Train a ByteLevel BPE tokenizer on `WORDS` and save it with a random tiny Llama under `path`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>", "</s>", "<pad>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([make_text(s, 400) for s in range(20)], trainer=trainer)
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=len(hf_tok), max_position_embeddings=512,
        bos_token_id=hf_tok.bos_token_id, eos_token_id=hf_tok.eos_token_id, pad_token_id=hf_tok.pad_token_id,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    hf_tok.save_pretrained(path)
    return path


def load_tiny(path: Path) -> lmscope.Model:
    return lmscope.load_model(str(path), device="cpu", dtype="float32")
