"""Tiny randomly initialised Hugging Face models, one per supported architecture family.

Built from `transformers` configs, so no weights are downloaded. Each entry also names, independently of
lmscope's hook maps (written by hand from the HF modelling source, with the full path from the top-level
model), the module whose output is the MLP's contribution to the residual stream and the MLP's down
projection, whose input is the MLP's neurons, so tests can check the maps against plain PyTorch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import transformers as tf

VOCAB = 97
D = 32
SPECIAL = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}


@dataclass(frozen=True)
class Tiny:
    family: str
    build: Callable[[], torch.nn.Module]
    mlp_contribution: str | None  # module path, written by hand from the HF source (layer 0)
    sequential: bool  # resid_mid = resid_pre + attn_out, resid_post = resid_mid + mlp_out
    parallel: bool = False  # GPT-NeoX: resid_post = resid_pre + attn_out + mlp_out
    hidden_states_final_norm: bool = True  # HF's last hidden state has the final norm applied
    mlp_down: str = "model.layers.0.mlp.down_proj"  # layer 0's down projection: its input is the MLP's neurons


def _decoder(cfg_cls: type, model_cls: type, **extra: object) -> Callable[[], torch.nn.Module]:
    def build() -> torch.nn.Module:
        torch.manual_seed(0)
        cfg = cfg_cls(
            vocab_size=VOCAB,
            hidden_size=D,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            **SPECIAL,
            **extra,
        )
        return model_cls(cfg).eval()

    return build


def _gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = tf.GPT2Config(vocab_size=VOCAB, n_embd=D, n_layer=3, n_head=4, n_positions=64, **SPECIAL)
    return tf.GPT2LMHeadModel(cfg).eval()


def _neox(parallel: bool) -> Callable[[], torch.nn.Module]:
    def build() -> torch.nn.Module:
        torch.manual_seed(0)
        cfg = tf.GPTNeoXConfig(
            vocab_size=VOCAB,
            hidden_size=D,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            max_position_embeddings=64,
            use_parallel_residual=parallel,
            **SPECIAL,
        )
        return tf.GPTNeoXForCausalLM(cfg).eval()

    return build


def _bert(cfg_cls: type, model_cls: type) -> Callable[[], torch.nn.Module]:
    def build() -> torch.nn.Module:
        torch.manual_seed(0)
        cfg = cfg_cls(
            vocab_size=VOCAB,
            hidden_size=D,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            max_position_embeddings=72,
            **SPECIAL,
        )
        return model_cls(cfg).eval()

    return build


GEMMA_EXTRA = {"head_dim": 8}

TINY: dict[str, Tiny] = {
    t.family: t
    for t in [
        Tiny("gpt2", _gpt2, "transformer.h.0.mlp", True, mlp_down="transformer.h.0.mlp.c_proj"),
        Tiny(
            "gpt_neox",
            _neox(True),
            "gpt_neox.layers.0.post_mlp_dropout",
            False,
            parallel=True,
            mlp_down="gpt_neox.layers.0.mlp.dense_4h_to_h",
        ),
        Tiny(
            "gpt_neox_sequential",
            _neox(False),
            "gpt_neox.layers.0.post_mlp_dropout",
            True,
            mlp_down="gpt_neox.layers.0.mlp.dense_4h_to_h",
        ),
        Tiny("llama", _decoder(tf.LlamaConfig, tf.LlamaForCausalLM), "model.layers.0.mlp", True),
        Tiny("mistral", _decoder(tf.MistralConfig, tf.MistralForCausalLM), "model.layers.0.mlp", True),
        Tiny("qwen2", _decoder(tf.Qwen2Config, tf.Qwen2ForCausalLM), "model.layers.0.mlp", True),
        Tiny("qwen3", _decoder(tf.Qwen3Config, tf.Qwen3ForCausalLM, head_dim=8), "model.layers.0.mlp", True),
        # SmolLM3: Llama layout with NoPE layers (no rotary embedding); interval 2 makes layer 1 one of them
        Tiny(
            "smollm3",
            _decoder(tf.SmolLM3Config, tf.SmolLM3ForCausalLM, no_rope_layer_interval=2),
            "model.layers.0.mlp",
            True,
        ),
        Tiny("gemma", _decoder(tf.GemmaConfig, tf.GemmaForCausalLM, **GEMMA_EXTRA), "model.layers.0.mlp", True),
        Tiny(
            "gemma2",
            _decoder(tf.Gemma2Config, tf.Gemma2ForCausalLM, **GEMMA_EXTRA),
            "model.layers.0.post_feedforward_layernorm",
            True,
        ),
        Tiny(
            "gemma3",
            _decoder(tf.Gemma3TextConfig, tf.Gemma3ForCausalLM, **GEMMA_EXTRA),
            "model.layers.0.post_feedforward_layernorm",
            True,
        ),
        Tiny(
            "olmo2",
            _decoder(tf.Olmo2Config, tf.Olmo2ForCausalLM),
            "model.layers.0.post_feedforward_layernorm",
            True,
        ),
        # BERT's MLP is `intermediate` (dense + GELU) then `output.dense`, whose result is normalised together
        # with the residual (post-LN): the neurons are output.dense's input, and no additive mlp_out exists
        Tiny(
            "bert",
            _bert(tf.BertConfig, tf.BertForMaskedLM),
            None,
            False,
            hidden_states_final_norm=False,
            mlp_down="bert.encoder.layer.0.output.dense",
        ),
        Tiny(
            "roberta",
            _bert(tf.RobertaConfig, tf.RobertaForMaskedLM),
            None,
            False,
            hidden_states_final_norm=False,
            mlp_down="roberta.encoder.layer.0.output.dense",
        ),
    ]
}


def tiny_ids(batch: int = 2, seq: int = 12, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, seq), generator=g)


def tiny_generic() -> torch.nn.Module:
    """An architecture with no lmscope hook map (OPT), for the generic fallback."""
    torch.manual_seed(0)
    cfg = tf.OPTConfig(
        vocab_size=VOCAB,
        hidden_size=D,
        ffn_dim=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        word_embed_proj_dim=D,
        **SPECIAL,
    )
    return tf.OPTForCausalLM(cfg).eval()


def save_tiny_with_tokenizer(family: str, path: str) -> str:
    """Save a tiny model and a tiny byte-level BPE tokenizer (trained offline) as an HF directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=["<pad>", "<s>", "</s>"], initial_alphabet=[], show_progress=False
    )
    text = ["The capital of France is Paris. def f(x): return x + 1"] * 20
    tok.train_from_iterator(text, trainer)
    fast = tf.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    TINY[family].build().save_pretrained(path)
    fast.save_pretrained(path)
    return path
