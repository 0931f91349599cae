"""Helpers for the explain tests: a scripted local HTTP server speaking the Anthropic Messages and OpenAI chat
shapes, and a small synthetic atlas with a planted feature."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np

from lmscope.atlas.schema import create, set_meta


def anthropic_reply(text: str, tin: int = 11, tout: int = 7) -> dict[str, Any]:
    return {
        "id": "msg_test", "type": "message", "role": "assistant", "model": "claude-test",
        "content": [{"type": "text", "text": text}], "stop_reason": "end_turn", "stop_sequence": None,
        "usage": {"input_tokens": tin, "output_tokens": tout},
    }  # fmt: skip


def openai_reply(text: str, tin: int = 11, tout: int = 7) -> dict[str, Any]:
    return {
        "id": "chatcmpl-test", "object": "chat.completion", "model": "test",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": tin, "completion_tokens": tout, "total_tokens": tin + tout},
    }  # fmt: skip


@dataclass
class Reply:
    status: int = 200
    body: Any = None  # dict -> JSON; str/bytes -> sent as is
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0


class ScriptedServer:
    """A real HTTP server on 127.0.0.1. POSTs are answered from `script` in order (the last entry repeats), or by
    `responder(path, body)` if given; GETs (GET /v1/models) answer `get_reply`, by default 200. Every request is
    recorded, header names in lower case."""

    def __init__(self, script: list[Reply] | None = None,
                 responder: Callable[[str, dict[str, Any]], Reply] | None = None,
                 get_reply: Reply | None = None) -> None:  # fmt: skip
        self.script = list(script or [])
        self.get_reply = get_reply or Reply(200, {"data": [{"id": "test-model"}], "object": "list"})
        self.responder = responder
        self.requests: list[tuple[str, str, Any, dict[str, str]]] = []
        self._lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, r: Reply) -> None:
                if r.delay:
                    time.sleep(r.delay)
                body = r.body
                data = json.dumps(body).encode() if isinstance(body, dict | list) else (
                    body.encode() if isinstance(body, str) else (body or b""))  # fmt: skip
                try:
                    self.send_response(r.status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for k, v in r.headers.items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def do_GET(self) -> None:
                with outer._lock:
                    outer.requests.append(("GET", self.path, None, {k.lower(): v for k, v in self.headers.items()}))
                self._send(outer.get_reply)

            def do_POST(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(n) or b"null")
                with outer._lock:
                    outer.requests.append(("POST", self.path, body, {k.lower(): v for k, v in self.headers.items()}))
                    if outer.responder is not None:
                        reply = None
                    else:
                        reply = outer.script.pop(0) if len(outer.script) > 1 else outer.script[0]
                if reply is None:
                    assert outer.responder is not None
                    reply = outer.responder(self.path, body)
                self._send(reply)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def posts(self) -> list[tuple[str, str, Any, dict[str, str]]]:
        return [r for r in self.requests if r[0] == "POST"]

    def __enter__(self) -> ScriptedServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


# ---------------------------------------------------------------------------------------------- synthetic atlas
WORDS = ["the", "cat", "sat", "on", "mat", "and", "a", "dog", "ran", "to", "house", "of", "in", "is", "it", "law",
         "court", "said", "that", "was"]  # fmt: skip
DIGITS = [str(d) for d in range(10)]
PUNCT = [".", ",", "(", ")", ":", "\n", '"']


def synthetic_vocab() -> list[str]:
    """Word tokens with and without a leading space, digits, punctuation. Id 0 is a BOS-like special."""
    return ["<s>"] + [" " + w for w in WORDS] + WORDS + DIGITS + [" " + d for d in DIGITS[:3]] + PUNCT


def synthetic_corpus(n_ctx: int, context: int, seed: int = 0) -> tuple[list[str], np.ndarray]:
    """Contexts of prose-like token sequences; every tenth contains numbers made of digit tokens."""
    vocab = synthetic_vocab()
    ids = {t: i for i, t in enumerate(vocab)}
    rng = np.random.default_rng(seed)
    words = [ids[" " + w] for w in WORDS]
    punct = [ids[p] for p in (".", ",")]
    digits = [ids[d] for d in DIGITS]
    toks = np.zeros((n_ctx, context), dtype=np.int64)
    for c in range(n_ctx):
        row = [0]
        with_numbers = c % 10 == 0
        while len(row) < context:
            r = rng.random()
            if with_numbers and r < 0.12:
                row.append(ids[" " + DIGITS[int(rng.integers(0, 3))]])
                row.extend(int(rng.choice(digits)) for _ in range(int(rng.integers(0, 3))))
            elif r < 0.2:
                row.append(int(rng.choice(punct)))
            else:
                row.append(int(rng.choice(words)))
        toks[c] = row[:context]
    return vocab, toks


def write_atlas(path: Path, vocab: list[str], tokens: np.ndarray, acts: np.ndarray, top_k: int = 12, bins: int = 4,
                per_bin: int = 3, before: int = 8, after: int = 4) -> Path:  # fmt: skip
    """An atlas file with the given activations [n_ctx, C, F], written through the schema (like a build)."""
    n_ctx, C, F = acts.shape
    conn = create(path)
    rng = np.random.default_rng(0)
    with conn:
        conn.executemany("INSERT INTO vocab (id, text) VALUES (?, ?)", list(enumerate(vocab)))
        conn.executemany("INSERT INTO contexts (id, tokens) VALUES (?, ?)",
                         [(i, tokens[i].astype("<i4").tobytes()) for i in range(n_ctx)])  # fmt: skip
        for f in range(F):
            a = acts[..., f]
            fired = a > 0
            nf = int(fired.sum())
            mx = float(a.max())
            conn.execute(
                "INSERT INTO features VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (f, nf, nf / a.size, float(a[fired].mean()) if nf else 0.0, mx, int(nf == 0),
                 json.dumps({"width": mx / 8 if mx else 0, "counts": [0] * 8}), None, "[]", "[]"),
            )  # fmt: skip

            def add(kind: str, b: int, rank: int, c: int, p: int, f: int = f, a: np.ndarray = a) -> None:
                s, e = max(0, p - before), min(C, p + after + 1)
                text = "".join(vocab[t] for t in tokens[c, s:e])
                conn.execute(
                    "INSERT INTO examples (feature, kind, bin, rank, context, pos, act, start, acts, peak_token, "
                    "text) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (f, kind, b, rank, c, p, float(a[c, p]), s, a[c, s:e].astype("<f4").tobytes(),
                     int(tokens[c, p]), text),
                )  # fmt: skip

            if not nf:
                continue
            peak_pos = a.argmax(1)
            peak = a.max(1)
            order = [c for c in np.argsort(-peak, kind="stable") if peak[c] > 0][:top_k]
            for rank, c in enumerate(order):
                add("top", -1, rank, int(c), int(peak_pos[c]))
            width = mx / bins
            cs, ps = np.nonzero(fired)
            for b in range(bins):
                lo, hi = b * width, (b + 1) * width
                sel = [
                    (c, p)
                    for c, p in zip(cs, ps, strict=True)
                    if lo <= a[c, p] < hi or (b == bins - 1 and a[c, p] == mx)
                ]
                conn.execute("INSERT INTO quantile_bins VALUES (?, ?, ?, ?, ?)", (f, b, lo, hi, len(sel)))
                pick = rng.permutation(len(sel))[:per_bin]
                chosen = sorted((sel[i] for i in pick), key=lambda cp: -a[cp])
                for rank, (c, p) in enumerate(chosen):
                    add("quantile", b, rank, int(c), int(p))
        conn.execute(
            "INSERT INTO search (text, feature, kind, ref) SELECT text, feature, 'example', rowid FROM examples "
            "WHERE kind = 'top'"
        )
        set_meta(conn, "summary", {"model": "synthetic", "hook": "none", "d_sae": F, "tokens": int(tokens.size),
                                   "context": C})  # fmt: skip
        set_meta(conn, "provenance", {"model": {"spec": "synthetic"}, "dictionary": {}})
        set_meta(conn, "metrics", {})
        set_meta(conn, "complete", 1)
    conn.close()
    return path


def planted_atlas(path: Path, n_ctx: int = 200, context: int = 48, seed: int = 0, n_random: int = 6) -> Path:
    """Feature 0 fires exactly on digit tokens; feature 1 and features 4 .. 3 + n_random fire at random positions
    (like random directions); feature 2 fires on ' court' and ' law'; feature 3 is dead."""
    vocab, toks = synthetic_corpus(n_ctx, context, seed)
    rng = np.random.default_rng(seed + 1)
    acts = np.zeros((n_ctx, context, 4 + n_random), dtype=np.float32)
    is_digit = np.array([t.strip().isdigit() for t in vocab])
    d = is_digit[toks]
    d[:, 0] = False
    acts[..., 0] = np.where(d, 1.0 + 4.0 * rng.random(d.shape), 0.0)
    for f in [1, *range(4, 4 + n_random)]:
        rand = rng.random((n_ctx, context)) < 0.03
        rand[:, 0] = False
        acts[..., f] = np.where(rand, rng.random((n_ctx, context)) * 3.0, 0.0)
    legal = np.isin(np.array(vocab, dtype=object)[toks], [" court", " law"])
    acts[..., 2] = np.where(legal, 2.0 + rng.random(legal.shape), 0.0)
    return write_atlas(path, vocab, toks, acts)


# ----------------------------------------------------------------------------------------- tiny local chat model
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def save_tiny_chat_model(path: Path, reply: str, after: str = "Label:") -> Path:
    """A tiny Llama chat model with a known answer, for the `local` explainer, saved as a Hugging Face directory
    (offline, about a second): a byte-level BPE tokenizer with a chat template, and a *bigram* model whose next token
    depends only on the current one (attention and MLP outputs are zero, embeddings one-hot, the output layer a
    successor table). Greedily, after the last token of `after` it writes `reply`, then the end-of-sequence token;
    from any other token it ends at once. So the local backend's real generation path gives a predictable reply."""
    import torch
    import transformers as tf
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<pad>", "<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator([f"{after}{reply}\n"] * 50, trainer)  # the reply's words become single tokens
    fast = tf.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    fast.chat_template = CHAT_TEMPLATE
    n = -(-len(fast) // 8) * 8  # hidden size = vocabulary size (one-hot embeddings), a multiple of the 4 heads
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=n, hidden_size=n, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=8192,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)  # fmt: skip
    model = tf.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(torch.eye(n))
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    set_bigram_reply(model, fast, reply, after)
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return path


def set_bigram_reply(model: Any, tokenizer: Any, reply: str, after: str = "Label:") -> list[int]:
    """Rewrite the bigram model's output layer so that after `after` it writes `reply` then stops; returns the
    reply's token ids. The chain must be a function of the current token (no token followed by two others)."""
    import torch

    start = tokenizer(after, add_special_tokens=False)["input_ids"][-1]
    ids = tokenizer(reply, add_special_tokens=False)["input_ids"]
    nxt: dict[int, int] = {}
    for a, b in zip([start, *ids], [*ids, tokenizer.eos_token_id], strict=True):
        assert nxt.setdefault(a, b) == b, f"token {a} would need two successors in {reply!r}"
    w = model.get_output_embeddings().weight
    with torch.no_grad():
        w.zero_()
        w[tokenizer.eos_token_id, :] = 1.0  # by default: stop
        for a, b in nxt.items():
            w[:, a] = 0.0
            w[b, a] = 1.0
    return ids
