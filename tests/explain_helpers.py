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
