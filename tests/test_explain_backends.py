"""API backends against real HTTP servers on 127.0.0.1 speaking the Anthropic Messages and OpenAI chat shapes:
success, 429 then success (Retry-After honoured), a malformed reply, a timeout, and the pre-flight checks."""

from __future__ import annotations

import importlib.util
import json
import sys
import threading
import time

import pytest

from explain_helpers import Reply, ScriptedServer, anthropic_reply, openai_reply
from lmscope.explain.backends import AnthropicBackend, Caller, OpenAIBackend
from lmscope.explain.ops import BackendError, ExplainError, JsonCache, OpsConfig, Usage, run_limited, with_retries

# only the tests that talk through the anthropic SDK need it; the OpenAI backend is plain HTTP
needs_anthropic = pytest.mark.skipif(
    importlib.util.find_spec("anthropic") is None,
    reason="the anthropic SDK is not installed: pip install 'lmscope[llm]'",
)

MSGS = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "label this"}]
FAST = OpsConfig(concurrency=1, retries=2, backoff=0.01, max_backoff=0.5, timeout=0.5)


def openai_backend(url: str, timeout: float = 0.5) -> OpenAIBackend:
    return OpenAIBackend("test-model", base_url=f"{url}/v1", api_key="sk-test", timeout=timeout)


def anthropic_backend(url: str, timeout: float = 0.5) -> AnthropicBackend:
    return AnthropicBackend("claude-test", api_key="test-key", base_url=url, timeout=timeout)


# ---------------------------------------------------------------------------------------------- OpenAI shape
def test_openai_success_sends_the_chat_shape() -> None:
    with ScriptedServer([Reply(200, openai_reply("Label: digits", 12, 3))]) as srv:
        c = openai_backend(srv.url).complete(MSGS, max_tokens=50)
    assert (c.text, c.input_tokens, c.output_tokens) == ("Label: digits", 12, 3)
    (_method, path, body, headers), = srv.posts  # fmt: skip
    assert path == "/v1/chat/completions"
    assert body["model"] == "test-model" and body["messages"] == MSGS and body["max_tokens"] == 50
    assert headers["authorization"] == "Bearer sk-test"


def test_openai_429_then_success_honours_retry_after() -> None:
    script = [Reply(429, {"error": "slow down"}, {"Retry-After": "0.2"}), Reply(200, openai_reply("ok"))]
    usage, waits = Usage(), []
    with ScriptedServer(script) as srv:
        b = openai_backend(srv.url)
        out = with_retries(lambda: b.complete(MSGS), FAST, usage, sleep=lambda s: (waits.append(s), time.sleep(s)))
    assert out.text == "ok" and len(srv.posts) == 2
    assert waits == [pytest.approx(0.2)] and usage.retries == 1 and usage.failures == 0


def test_openai_5xx_retried_then_gives_up_with_a_bounded_count() -> None:
    with ScriptedServer([Reply(503, {"error": "down"})]) as srv:
        b = openai_backend(srv.url)
        with pytest.raises(BackendError, match=r"HTTP 503.*gave up after 3 attempts"):
            with_retries(lambda: b.complete(MSGS), FAST, Usage(), sleep=lambda s: None)
    assert len(srv.posts) == 3


@pytest.mark.parametrize("body", ["this is not json", {"choices": []}, {"choices": [{"message": {"content": None}}]}])
def test_openai_malformed_reply_is_a_clear_error_and_not_retried(body: object) -> None:
    with ScriptedServer([Reply(200, body)]) as srv:
        b = openai_backend(srv.url)
        with pytest.raises(BackendError, match="malformed reply") as exc:
            with_retries(lambda: b.complete(MSGS), FAST, Usage(), sleep=lambda s: None)
    assert not exc.value.retryable and len(srv.posts) == 1


def test_openai_timeout_is_retryable_and_bounded() -> None:
    with ScriptedServer([Reply(200, openai_reply("late"), delay=1.5)]) as srv:
        b = openai_backend(srv.url, timeout=0.3)
        t0 = time.monotonic()
        with pytest.raises(BackendError, match=r"timed out after 0\.3 s"):
            with_retries(lambda: b.complete(MSGS), OpsConfig(retries=1, backoff=0.0, timeout=0.3), Usage(),
                         sleep=lambda s: None)  # fmt: skip
        assert time.monotonic() - t0 < 1.5
    assert len(srv.posts) == 2


def test_openai_check_unreachable_endpoint_fails_before_work() -> None:
    with ScriptedServer([Reply(200, openai_reply("x"))]) as srv:
        url = srv.url
    with pytest.raises(ExplainError, match=r"cannot reach .*--base-url"):
        openai_backend(url).check()


def test_openai_check_without_key_for_the_public_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(ExplainError, match="set OPENAI_API_KEY"):
        OpenAIBackend("gpt-4o-mini").check()


# ---------------------------------------------------------------------------------------------- Anthropic shape
@needs_anthropic
def test_anthropic_success_sends_the_messages_shape() -> None:
    with ScriptedServer([Reply(200, anthropic_reply("Label: the word ' court'", 20, 6))]) as srv:
        b = anthropic_backend(srv.url)
        b.check()
        c = b.complete(MSGS, max_tokens=64)
    assert (c.text, c.input_tokens, c.output_tokens) == ("Label: the word ' court'", 20, 6)
    (_, path, body, headers), = srv.posts  # fmt: skip
    assert path == "/v1/messages"
    assert body["system"] == "be brief" and body["messages"] == [{"role": "user", "content": "label this"}]
    assert body["model"] == "claude-test" and body["max_tokens"] == 64
    # the SDK sends the key as x-api-key (older versions) or as a bearer token (newer ones)
    assert "test-key" in (headers.get("x-api-key"), headers.get("authorization", "").removeprefix("Bearer "))
    assert "anthropic-version" in headers


@needs_anthropic
def test_anthropic_429_then_success_honours_retry_after() -> None:
    err = {"type": "error", "error": {"type": "rate_limit_error", "message": "slow down"}}
    script = [Reply(429, err, {"Retry-After": "0.1"}), Reply(200, anthropic_reply("fine"))]
    usage, waits = Usage(), []
    with ScriptedServer(script) as srv:
        b = anthropic_backend(srv.url)
        out = with_retries(lambda: b.complete(MSGS), FAST, usage, sleep=waits.append)
    assert out.text == "fine" and len(srv.posts) == 2 and waits == [pytest.approx(0.1)]


@needs_anthropic
def test_anthropic_malformed_reply() -> None:
    with ScriptedServer([Reply(200, "{not json")]) as srv:
        b = anthropic_backend(srv.url)
        with pytest.raises(BackendError, match="malformed"):
            with_retries(lambda: b.complete(MSGS), FAST, Usage(), sleep=lambda s: None)
    assert len(srv.posts) == 1


@needs_anthropic
def test_anthropic_timeout() -> None:
    with ScriptedServer([Reply(200, anthropic_reply("late"), delay=1.5)]) as srv:
        b = anthropic_backend(srv.url, timeout=0.3)
        with pytest.raises(BackendError, match="timed out"):
            with_retries(lambda: b.complete(MSGS), OpsConfig(retries=0, timeout=0.3), Usage())
    assert len(srv.posts) == 1


def test_anthropic_missing_key_names_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    with pytest.raises(ExplainError, match="set ANTHROPIC_API_KEY or use --explainer stats"):
        AnthropicBackend("claude-test").check()


@needs_anthropic
def test_anthropic_without_the_sdk_names_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "anthropic", None)  # `import anthropic` now raises ImportError
    with pytest.raises(ExplainError, match=r"needs the anthropic SDK: pip install 'lmscope\[llm\]'"):
        AnthropicBackend("claude-test", api_key="test-key").check()


@needs_anthropic
def test_anthropic_rejected_key_fails_in_check() -> None:
    err = {"type": "error", "error": {"type": "authentication_error", "message": "invalid x-api-key"}}
    with (
        ScriptedServer([Reply(401, err)], get_reply=Reply(401, err)) as srv,
        pytest.raises(ExplainError, match="refused the key"),
    ):
        AnthropicBackend("claude-test", api_key="bad", base_url=srv.url, timeout=0.5).check()


# ---------------------------------------------------------------------------------------------- ops
def test_caller_caches_parsed_replies_and_counts_tokens(tmp_path) -> None:
    cache = tmp_path / "cache.json"
    with ScriptedServer([Reply(200, openai_reply("Label: digits", 100, 5))]) as srv:
        usage = Usage()
        caller = Caller(openai_backend(srv.url), FAST, usage, JsonCache(cache))
        assert caller.call(MSGS, str.upper) == "LABEL: DIGITS"
        again = Caller(openai_backend(srv.url), FAST, usage, JsonCache(cache))  # a rerun reads the file
        assert again.call(MSGS, str.upper) == "LABEL: DIGITS"
    assert len(srv.posts) == 1 and usage.requests == 1 and usage.cached == 1
    assert usage.input_tokens == 100 and usage.output_tokens == 5
    assert len(json.loads(cache.read_text())) == 1
    assert "cost unknown" in usage.summary()


def test_cost_accounting_for_a_priced_model() -> None:
    u = Usage()
    u.add("claude-sonnet-4-5", 1_000_000, 100_000)
    assert u.cost_usd == pytest.approx(3.0 + 1.5) and "$4.5000" in u.summary()


def test_concurrency_limit_is_reached_and_never_exceeded() -> None:
    # Each call waits at a barrier for two others, so the run only proceeds if 3 calls are in flight at once
    # (run one at a time, the barrier times out and every call fails). Once 3 are in, they stay in for a while
    # and watch for a 4th, which a pool wider than 3 would start at once.
    limit, live, peak, lock = 3, [0], [0], threading.Lock()
    barrier, crowded = threading.Barrier(limit, timeout=5), threading.Event()

    def work(i: int) -> int:
        with lock:
            live[0] += 1
            peak[0] = max(peak[0], live[0])
            if live[0] > limit:
                crowded.set()
        try:
            barrier.wait()
            crowded.wait(timeout=0.1)  # hold the slot: a 4th call, if allowed, arrives now
        finally:
            with lock:
                live[0] -= 1
        if i == 3:
            raise BackendError("boom")
        return i * 2

    out = dict(run_limited(work, range(12), concurrency=limit))
    assert peak[0] == limit and not crowded.is_set()
    assert sorted(out) == list(range(12))
    assert isinstance(out[3], BackendError) and str(out[3]) == "boom"
    assert all(out[i] == 2 * i for i in range(12) if i != 3), out  # no call broke the barrier
