"""Operations around language-model calls: retries with backoff, a concurrency limit, token and cost accounting,
and a JSON cache of replies keyed by (explainer, model, prompt hash), written atomically so a rerun resumes."""

from __future__ import annotations

import hashlib
import json
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from lmscope.core.atomic import atomic_write_json
from lmscope.errors import LmscopeError

T = TypeVar("T")
R = TypeVar("R")


class ExplainError(LmscopeError):
    """Automated interpretability cannot run: a missing key, an unreachable endpoint, a bad option."""


class BackendError(ExplainError):
    """One request to a language-model backend failed. `retryable` errors (429, 5xx, timeouts) are retried."""

    def __init__(self, message: str, *, retryable: bool = False, retry_after: float | None = None,
                 status: int | None = None) -> None:  # fmt: skip
        super().__init__(message)
        self.retryable = retryable
        self.retry_after = retry_after
        self.status = status


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (seconds form; the HTTP-date form is read as 'unknown')."""
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


@dataclass(frozen=True)
class OpsConfig:
    """How backend requests are run."""

    concurrency: int = 4  # requests in flight at once
    retries: int = 4  # extra attempts after a retryable failure
    backoff: float = 1.0  # first wait in seconds; doubles each attempt, with jitter
    max_backoff: float = 60.0
    timeout: float = 60.0  # seconds per request

    def __post_init__(self) -> None:
        if self.concurrency < 1 or self.retries < 0 or self.timeout <= 0 or self.backoff < 0:
            raise ExplainError("concurrency must be >= 1, retries >= 0, timeout > 0 and backoff >= 0")

    def delay(self, attempt: int, retry_after: float | None) -> float:
        """Seconds to wait before retry number `attempt` (0-based): Retry-After if the server sent one."""
        if retry_after is not None:
            return min(self.max_backoff, retry_after)
        return min(self.max_backoff, self.backoff * (2**attempt) * (0.5 + random.random()))


# USD per million (input, output) tokens, by model-name prefix; unknown models are reported without a cost.
PRICES: dict[str, tuple[float, float]] = {
    "claude-opus-4": (15.0, 75.0),
    "claude-sonnet-4": (3.0, 15.0),
    "claude-3-7-sonnet": (3.0, 15.0),
    "claude-3-5-sonnet": (3.0, 15.0),
    "claude-haiku-4": (1.0, 5.0),
    "claude-3-5-haiku": (0.8, 4.0),
    "claude-3-haiku": (0.25, 1.25),
    "gpt-4o-mini": (0.15, 0.6),
    "gpt-4o": (2.5, 10.0),
    "gpt-4.1-mini": (0.4, 1.6),
    "gpt-4.1": (2.0, 8.0),
}


def price_of(model: str) -> tuple[float, float] | None:
    best = max((p for p in PRICES if model.startswith(p)), key=len, default=None)
    return PRICES[best] if best else None


@dataclass
class Usage:
    """Thread-safe counts of requests, retries, tokens and cost over one command."""

    requests: int = 0
    cached: int = 0
    retries: int = 0
    failures: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    priced: bool = True
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, model: str, input_tokens: int, output_tokens: int) -> None:
        price = price_of(model)
        with self._lock:
            self.requests += 1
            self.input_tokens += int(input_tokens)
            self.output_tokens += int(output_tokens)
            if price is None:
                self.priced = False
            else:
                self.cost_usd += (input_tokens * price[0] + output_tokens * price[1]) / 1e6

    def bump(self, name: str) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + 1)

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("requests", "cached", "retries", "failures", "input_tokens",
                                              "output_tokens", "cost_usd", "priced")}  # fmt: skip

    def summary(self) -> str:
        cost = f"${self.cost_usd:.4f}" if self.priced else "cost unknown (no price for this model; local is free)"
        return (
            f"{self.requests} requests ({self.cached} answered from the cache, {self.retries} retries, "
            f"{self.failures} failed); tokens in {self.input_tokens:,}, out {self.output_tokens:,}; {cost}"
        )


def with_retries(
    fn: Callable[[], T], cfg: OpsConfig, usage: Usage | None = None, sleep: Callable[[float], None] = time.sleep
) -> T:
    """Call `fn`, retrying retryable BackendErrors with exponential backoff + jitter (or Retry-After)."""
    for attempt in range(cfg.retries + 1):
        try:
            return fn()
        except BackendError as exc:
            if not exc.retryable or attempt == cfg.retries:
                if usage is not None:
                    usage.bump("failures")
                if exc.retryable:
                    raise BackendError(f"{exc} (gave up after {cfg.retries + 1} attempts)", status=exc.status) from exc
                raise
            if usage is not None:
                usage.bump("retries")
            sleep(cfg.delay(attempt, exc.retry_after))
    raise AssertionError("unreachable")  # pragma: no cover


def run_limited(fn: Callable[[T], R], items: Iterable[T], concurrency: int) -> Iterator[tuple[T, R | Exception]]:
    """Apply `fn` to each item with at most `concurrency` calls at once; yields (item, result or exception) in
    completion order. Exceptions are yielded, not raised, so one bad feature does not stop the others."""
    items = list(items)
    if concurrency <= 1:
        for it in items:
            outcome: Any
            try:
                outcome = fn(it)
            except Exception as exc:  # reported per item by the caller
                outcome = exc
            yield it, outcome
        return
    from concurrent.futures import as_completed

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        futs = {pool.submit(fn, it): it for it in items}
        for fut in as_completed(futs):
            error = fut.exception()
            yield futs[fut], (error if isinstance(error, Exception) else fut.result())


def prompt_key(explainer: str, model: str, prompt: Any) -> str:
    blob = json.dumps([explainer, model, prompt], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


class JsonCache:
    """Replies keyed by prompt_key, in one JSON file rewritten atomically after each new entry."""

    def __init__(self, path: str | Path | None) -> None:
        self.path = Path(path) if path else None
        self._lock = threading.Lock()
        self.data: dict[str, Any] = {}
        if self.path is not None and self.path.is_file():
            try:
                self.data = json.loads(self.path.read_text())
            except (ValueError, OSError) as exc:
                raise ExplainError(f"the cache {self.path} is unreadable ({exc}); delete it to start afresh") from None
            if not isinstance(self.data, dict):
                raise ExplainError(f"the cache {self.path} is not a JSON object; delete it to start afresh")

    def get(self, key: str) -> Any:
        with self._lock:
            return self.data.get(key)

    def put(self, key: str, value: Any) -> None:
        with self._lock:
            self.data[key] = value
            if self.path is not None:
                atomic_write_json(self.path, self.data, fsync=False, indent=None)
