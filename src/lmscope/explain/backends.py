"""Language-model backends for explaining and scoring: the Claude Messages API (through the `anthropic` SDK),
any OpenAI-compatible chat endpoint (plain HTTP, so llama.cpp and vLLM servers work), and a local Hugging Face
chat model loaded with `lmscope.load_model`.

Every backend takes chat messages ({"role": "system"|"user"|"assistant", "content": str}) and returns a
`Completion`. Failures raise `BackendError`; 429, 5xx, timeouts and dropped connections are `retryable`.
`check()` runs before any work so that a missing key or an unreachable endpoint fails first, and clearly.
"""

from __future__ import annotations

import json
import os
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from lmscope.explain.ops import (
    BackendError,
    ExplainError,
    JsonCache,
    OpsConfig,
    Usage,
    parse_retry_after,
    prompt_key,
    with_retries,
)

T = TypeVar("T")

Message = dict[str, str]

DEFAULT_MODELS = {"anthropic": "claude-sonnet-4-5", "openai": "gpt-4o-mini", "local": "smollm2-135m"}
ANTHROPIC_URL = "https://api.anthropic.com"
OPENAI_URL = "https://api.openai.com/v1"


@dataclass(frozen=True)
class Completion:
    text: str
    input_tokens: int = 0
    output_tokens: int = 0


class Backend(Protocol):
    name: str
    model: str

    def check(self) -> None: ...

    def complete(self, messages: list[Message], max_tokens: int = 300, temperature: float = 0.0) -> Completion: ...


def _retryable_status(status: int) -> bool:
    return status == 429 or status == 408 or status >= 500


def _split_system(messages: list[Message]) -> tuple[str | None, list[Message]]:
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system") or None
    return system, [m for m in messages if m["role"] != "system"]


class AnthropicBackend:
    """Claude through the Messages API. Retries are ours (see ops.with_retries), so the SDK's are off."""

    name = "anthropic"

    def __init__(self, model: str | None = None, api_key: str | None = None, base_url: str | None = None,
                 timeout: float = 60.0) -> None:  # fmt: skip
        self.model = model or DEFAULT_MODELS["anthropic"]
        self.api_key = api_key if api_key is not None else os.environ.get("ANTHROPIC_API_KEY")
        self.base_url = base_url or os.environ.get("ANTHROPIC_BASE_URL") or ANTHROPIC_URL
        self.timeout = timeout
        self._client: Any = None

    def _sdk(self) -> Any:
        try:
            import anthropic
        except ImportError:
            raise ExplainError(
                "the anthropic explainer needs the anthropic SDK: pip install 'lmscope[llm]' (or pip install "
                "anthropic), or use --explainer stats"
            ) from None
        return anthropic

    def client(self) -> Any:
        if self._client is None:
            if not self.api_key:
                raise ExplainError("no Anthropic API key: set ANTHROPIC_API_KEY or use --explainer stats")
            sdk = self._sdk()
            self._client = sdk.Anthropic(api_key=self.api_key, base_url=self.base_url, timeout=self.timeout,
                                         max_retries=0)  # fmt: skip
        return self._client

    def _error(self, exc: Exception) -> BackendError:
        sdk = self._sdk()
        if isinstance(exc, sdk.APITimeoutError):
            return BackendError(f"Anthropic request timed out after {self.timeout:g} s", retryable=True)
        if isinstance(exc, sdk.APIConnectionError):
            return BackendError(f"cannot reach the Anthropic API at {self.base_url} ({exc})", retryable=True)
        if isinstance(exc, sdk.APIStatusError):
            status = int(exc.status_code)
            retry_after = parse_retry_after(exc.response.headers.get("retry-after"))
            if status in (401, 403):
                return BackendError(f"the Anthropic API refused the key (HTTP {status}): check ANTHROPIC_API_KEY",
                                    status=status)  # fmt: skip
            return BackendError(
                f"Anthropic API error HTTP {status}: {exc.message}", retryable=_retryable_status(status),
                retry_after=retry_after, status=status,
            )  # fmt: skip
        return BackendError(f"malformed reply from the Anthropic API ({type(exc).__name__}: {exc})")

    def check(self) -> None:
        """Key present, SDK installed, endpoint reachable (GET /v1/models; any HTTP answer but 401/403 is fine)."""
        client = self.client()
        sdk = self._sdk()
        try:
            client.models.list(limit=1)
        except sdk.APIStatusError as exc:
            if exc.status_code in (401, 403):
                raise ExplainError(
                    f"the Anthropic API at {self.base_url} refused the key (HTTP {exc.status_code}): set a valid "
                    "ANTHROPIC_API_KEY or use --explainer stats"
                ) from None
        except (sdk.APIConnectionError, sdk.APITimeoutError) as exc:
            raise ExplainError(
                f"cannot reach the Anthropic API at {self.base_url} ({exc}); check the network or "
                "ANTHROPIC_BASE_URL, or use --explainer stats"
            ) from None

    def complete(self, messages: list[Message], max_tokens: int = 300, temperature: float = 0.0) -> Completion:
        client = self.client()
        sdk = self._sdk()
        system, turns = _split_system(messages)
        kwargs: dict[str, Any] = {"system": system} if system else {}
        try:
            # no temperature: recent SDKs and models no longer take one; the reply cache makes reruns stable
            msg = client.messages.create(model=self.model, max_tokens=max_tokens, messages=turns, **kwargs)
        except sdk.APIError as exc:
            raise self._error(exc) from None
        except (ValueError, TypeError, KeyError) as exc:
            raise BackendError(f"malformed reply from the Anthropic API ({exc})") from None
        try:
            text = "".join(b.text for b in msg.content if getattr(b, "type", None) == "text")
            usage = msg.usage
            return Completion(text, int(usage.input_tokens or 0), int(usage.output_tokens or 0))
        except (AttributeError, TypeError, ValueError) as exc:
            raise BackendError(f"malformed reply from the Anthropic API: {exc}") from None


class OpenAIBackend:
    """Any OpenAI-compatible `/chat/completions` endpoint, over plain HTTP (urllib: no extra dependency)."""

    name = "openai"

    def __init__(self, model: str | None = None, base_url: str | None = None, api_key: str | None = None,
                 timeout: float = 60.0) -> None:  # fmt: skip
        self.model = model or DEFAULT_MODELS["openai"]
        self.base_url = (base_url or os.environ.get("OPENAI_BASE_URL") or OPENAI_URL).rstrip("/")
        self.api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        self.timeout = timeout

    def _request(self, method: str, path: str, body: dict[str, Any] | None, timeout: float) -> dict[str, Any]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base_url + path, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            status = exc.code
            detail = exc.read()[:300].decode("utf-8", "replace")
            raise BackendError(
                f"{self.base_url}{path} answered HTTP {status}: {detail}", retryable=_retryable_status(status),
                retry_after=parse_retry_after(exc.headers.get("Retry-After")), status=status,
            ) from None  # fmt: skip
        except TimeoutError:
            raise BackendError(f"{self.base_url}{path} timed out after {timeout:g} s", retryable=True) from None
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, TimeoutError):
                raise BackendError(f"{self.base_url}{path} timed out after {timeout:g} s", retryable=True) from None
            raise BackendError(f"cannot reach {self.base_url} ({exc.reason})", retryable=True) from None
        except (ConnectionError, OSError) as exc:
            raise BackendError(f"connection to {self.base_url} failed ({exc})", retryable=True) from None
        try:
            out = json.loads(raw)
        except ValueError:
            raise BackendError(f"malformed reply from {self.base_url}{path}: not JSON ({raw[:120]!r})") from None
        if not isinstance(out, dict):
            raise BackendError(f"malformed reply from {self.base_url}{path}: not a JSON object")
        return out

    def check(self) -> None:
        """The endpoint answers HTTP at all (GET /models); 401/403 means a bad key. Both fail before any work."""
        if self.base_url == OPENAI_URL and not self.api_key:
            raise ExplainError(
                "no OpenAI API key: set OPENAI_API_KEY, or pass --base-url for a local server, or use --explainer stats"
            )
        try:
            self._request("GET", "/models", None, timeout=min(self.timeout, 10.0))
        except BackendError as exc:
            if exc.status in (401, 403):
                raise ExplainError(
                    f"{self.base_url} refused the key (HTTP {exc.status}): check OPENAI_API_KEY"
                ) from None
            if exc.status is None and "malformed" not in str(exc):
                raise ExplainError(
                    f"{exc}; start the server or pass the right --base-url (e.g. http://127.0.0.1:8080/v1), "
                    "or use --explainer stats"
                ) from None

    def complete(self, messages: list[Message], max_tokens: int = 300, temperature: float = 0.0) -> Completion:
        body = {"model": self.model, "messages": messages, "max_tokens": max_tokens, "temperature": temperature}
        out = self._request("POST", "/chat/completions", body, timeout=self.timeout)
        try:
            text = out["choices"][0]["message"]["content"]
            if not isinstance(text, str):
                raise TypeError("content is not a string")
        except (KeyError, IndexError, TypeError) as exc:
            raise BackendError(f"malformed reply from {self.base_url}: no choices[0].message.content ({exc})") from None
        usage = out.get("usage") or {}
        return Completion(text, int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0))


class LocalBackend:
    """A local Hugging Face chat model (default SmolLM2-135M-Instruct): greedy decoding, one request at a time.

    Small models follow formats poorly, so this backend takes a *prefill*: a final assistant message is written
    after the chat template's generation prompt and the model continues it (e.g. "Label:" or "["); the returned
    text includes the prefill. Repeated 3-grams are blocked, which stops the loops small models fall into.
    """

    name = "local"
    prefill = True

    def __init__(self, model: str | None = None, device: str = "auto", dtype: str = "auto", loaded: Any = None,
                 max_new_tokens: int | None = None) -> None:  # fmt: skip
        self.model = model or (getattr(loaded, "spec", None) if loaded is not None else None) or DEFAULT_MODELS["local"]
        self.device, self.dtype = device, dtype
        self.max_new_tokens = max_new_tokens
        self._model: Any = loaded
        self._lock = threading.Lock()

    def lm(self) -> Any:
        if self._model is None:
            from lmscope.model.loading import load_model

            self._model = load_model(self.model, device=self.device, dtype=self.dtype)
        return self._model

    def check(self) -> None:
        m = self.lm()
        if not getattr(m.tokenizer, "chat_template", None):
            raise ExplainError(f"{self.model} has no chat template, so it cannot explain; use a chat (instruct) model")

    def complete(self, messages: list[Message], max_tokens: int = 300, temperature: float = 0.0) -> Completion:
        import torch

        m = self.lm()
        prefill = messages[-1]["content"] if messages and messages[-1]["role"] == "assistant" else ""
        turns = messages[:-1] if prefill else messages
        text = m.tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True) + prefill
        ids = m.encode(text, add_special_tokens=False)
        tok = m.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        n_new = min(max_tokens, self.max_new_tokens or max_tokens)
        with self._lock, torch.no_grad():
            out = m.hf.generate(
                input_ids=ids.to(m.device), attention_mask=torch.ones_like(ids).to(m.device), max_new_tokens=n_new,
                do_sample=False, no_repeat_ngram_size=3, pad_token_id=pad,
            )  # fmt: skip
        new = out[0, ids.shape[-1] :].cpu()
        reply = prefill + tok.decode(new.tolist(), skip_special_tokens=True)
        return Completion(reply, int(ids.shape[-1]), int(new.shape[-1]))


EXPLAINERS = ("stats", "anthropic", "openai", "local")


def make_backend(kind: str, model: str | None = None, base_url: str | None = None, timeout: float = 60.0,
                 device: str = "auto", dtype: str = "auto") -> Backend:  # fmt: skip
    if kind == "anthropic":
        return AnthropicBackend(model, base_url=base_url, timeout=timeout)
    if kind == "openai":
        return OpenAIBackend(model, base_url=base_url, timeout=timeout)
    if kind == "local":
        return LocalBackend(model, device=device, dtype=dtype)
    raise ExplainError(f"unknown backend {kind!r}; choose one of anthropic, openai, local (or stats, offline)")


class Caller:
    """One backend behind the ops layer: the reply cache, retries with backoff, and usage accounting. A reply is
    cached only once it parses, so a malformed reply is asked again on the next run."""

    def __init__(self, backend: Backend, ops: OpsConfig | None = None, usage: Usage | None = None,
                 cache: JsonCache | None = None) -> None:  # fmt: skip
        self.backend = backend
        self.ops = ops or OpsConfig()
        self.usage = usage or Usage()
        self.cache = cache or JsonCache(None)

    @property
    def name(self) -> str:
        return f"{self.backend.name}:{self.backend.model}"

    def call(self, messages: list[Message], parse: Callable[[str], T], max_tokens: int = 300) -> T:
        key = prompt_key(self.backend.name, self.backend.model, [messages, max_tokens])
        hit = self.cache.get(key)
        if isinstance(hit, str):
            try:
                out = parse(hit)
                self.usage.bump("cached")
                return out
            except BackendError:
                pass
        done = with_retries(lambda: self.backend.complete(messages, max_tokens=max_tokens), self.ops, self.usage)
        self.usage.add(self.backend.model, done.input_tokens, done.output_tokens)
        out = parse(done.text)
        self.cache.put(key, done.text)
        return out
