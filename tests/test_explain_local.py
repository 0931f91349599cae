"""The `local` explainer end to end.

By default on a tiny Llama chat model with a known answer (tests/explain_helpers.py: a bigram model that, after
the prefill "Label:", writes a fixed reply): the real LocalBackend path from the chat-templated, prefilled prompt
through greedy generation to the parsed label, the usage and the label row; a reply with no label is reported as
that feature's failure and is not cached. On SmolLM2-135M-Instruct (marker `slow`, excluded from `make test`): two
features of a planted atlas get labels, and the local reader scores one of them.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest
import torch

from explain_helpers import planted_atlas, save_tiny_chat_model, set_bigram_reply
from lmscope.explain import ExplainError, LocalBackend, OpsConfig, explain_atlas, score_atlas
from lmscope.explain.prompts import EXPLAIN_SYSTEM

REPLY = " digit tokens inside numbers"


@pytest.fixture(scope="module")
def tiny_chat(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_chat_model(tmp_path_factory.mktemp("tiny-chat") / "model", REPLY)


def _labels(atlas: Path) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(atlas)
    rows = conn.execute("SELECT feature, text, source, explainer FROM labels ORDER BY feature").fetchall()
    conn.close()
    return rows


def test_local_explainer_on_a_tiny_chat_model(tiny_chat: Path, tmp_path: Path) -> None:
    backend = LocalBackend(str(tiny_chat), device="cpu", dtype="float32")  # loaded from disk by the backend
    m = backend.lm()
    prompts: list[torch.Tensor] = []  # the input ids of each prefill forward pass (decode steps see one token)
    handle = m.hf.get_input_embeddings().register_forward_hook(
        lambda mod, args, out: prompts.append(args[0][0].clone()) if args[0].shape[-1] > 1 else None
    )
    ops = OpsConfig(concurrency=1, retries=0)
    try:
        atlas = planted_atlas(tmp_path / "planted.db", n_random=1)
        report = explain_atlas(atlas, "local", features=[0, 2], backend=backend, ops=ops)
        name = f"local:{tiny_chat}"
        assert report.name == name and not report.failed
        label = REPLY.strip()
        assert report.done == [{"feature": 0, "label": label}, {"feature": 2, "label": label}]
        assert _labels(atlas) == [(0, label, "machine", name), (2, label, "machine", name)]

        # the prompts: system and user turns through the chat template, then the generation prompt and the
        # prefill, which the model continues (no end-of-turn after it); each holds its feature's examples
        assert len(prompts) == 2
        texts = [m.tokenizer.decode(p.tolist()) for p in prompts]
        for text in texts:
            assert text.startswith(f"<|system|>\n{EXPLAIN_SYSTEM}</s>\n<|user|>\n")
            assert "What does this feature detect?</s>\n" in text and text.endswith("<|assistant|>\nLabel:")
        assert "Example 1:" in texts[0] and any(d in texts[0] for d in "0123456789")  # digits (feature 0)
        assert " court" in texts[1] or " law" in texts[1]  # the legal words (feature 2)
        # usage: one request per feature, the prompt tokens as generated from, the reply's tokens and the end token
        n_reply = len(m.tokenizer(REPLY, add_special_tokens=False)["input_ids"])
        assert report.usage.requests == 2 and report.usage.failures == 0
        assert report.usage.input_tokens == sum(len(p) for p in prompts)
        assert report.usage.output_tokens == 2 * (n_reply + 1)

        # a rerun is answered from the atlas (skipped), with no generation at all
        again = explain_atlas(atlas, "local", features=[0, 2], backend=backend, ops=ops)
        assert again.skipped == 2 and again.usage.requests == 0 and len(prompts) == 2

        # a reply with no label is that feature's failure, reported, with nothing written and nothing cached ...
        other = planted_atlas(tmp_path / "other.db", n_random=1)
        set_bigram_reply(m.hf, m.tokenizer, "\n")
        bad = explain_atlas(other, "local", features=[0], backend=backend, ops=ops)
        assert bad.done == [] and len(bad.failed) == 1 and bad.failed[0][0] == 0
        assert "malformed explanation reply: no label" in bad.failed[0][1]
        assert bad.usage.requests == 1 and bad.usage.output_tokens == 2  # "\n" and the end token
        assert _labels(other) == []
        # ... so once the model answers, the same prompt is generated again (not served from the reply cache)
        set_bigram_reply(m.hf, m.tokenizer, REPLY)
        fixed = explain_atlas(other, "local", features=[0], backend=backend, ops=ops)
        assert fixed.done == [{"feature": 0, "label": label}] and fixed.usage.requests == 1
        assert fixed.usage.cached == 0 and len(prompts) == 4
    finally:
        handle.remove()
        set_bigram_reply(m.hf, m.tokenizer, REPLY)


def test_local_explainer_needs_a_chat_template(tiny_chat: Path, tmp_path: Path) -> None:
    backend = LocalBackend(str(tiny_chat), device="cpu", dtype="float32")
    backend.lm().tokenizer.chat_template = None  # this backend's own copy of the model
    atlas = planted_atlas(tmp_path / "planted.db", n_random=1)
    with pytest.raises(ExplainError, match="has no chat template"):
        explain_atlas(atlas, "local", features=[0], backend=backend)
    assert _labels(atlas) == []


@pytest.mark.slow
@pytest.mark.smollm2
def test_local_explainer_labels_two_features(smollm2, tmp_path: Path) -> None:
    atlas = planted_atlas(tmp_path / "planted.db", n_random=1)
    backend = LocalBackend(loaded=smollm2)
    ops = OpsConfig(concurrency=1, retries=0)
    report = explain_atlas(atlas, "local", features=[0, 2], backend=backend, ops=ops)
    assert not report.failed and len(report.done) == 2
    assert report.usage.requests == 2 and report.usage.output_tokens > 0
    conn = sqlite3.connect(atlas)
    rows = conn.execute("SELECT feature, text, source, explainer FROM labels ORDER BY feature").fetchall()
    assert [r[0] for r in rows] == [0, 2]
    assert all(r[1].strip() and r[2] == "machine" and r[3] == "local:smollm2-135m" for r in rows)
    # a rerun is answered from the atlas (skipped), with no generation at all
    again = explain_atlas(atlas, "local", features=[0, 2], backend=backend, ops=ops)
    assert again.skipped == 2 and again.usage.requests == 0
    # the same weak model as a detection reader: it may answer badly, but the pipeline must report, not crash
    scored = score_atlas(atlas, "detection", "local", features=[0], backend=backend, ops=ops)
    assert len(scored.done) + len(scored.failed) == 1
    for d in scored.done:
        assert d["score"] is None or 0.0 <= d["score"] <= 1.0
