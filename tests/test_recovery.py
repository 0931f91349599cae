"""The ground-truth generator (lmscope.synthetic.data) and recovery scoring (lmscope.synthetic.recovery).

The generator must plant what its config says (power-law frequencies, hierarchies, correlations, offsets, noise),
and the scores must be right at the extremes: a perfect dictionary recovers everything, a random one nothing, and a
hand-built absorbing dictionary is caught absorbing while the truth is not.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from lmscope.dictionaries import DictConfig
from lmscope.synthetic.benchmark import RecoveryBenchConfig, dictionary_configs, run_recovery
from lmscope.synthetic.data import GroundTruth, GroundTruthConfig, Samples, generate
from lmscope.synthetic.errors import GroundTruthError, SyntheticError
from lmscope.synthetic.recovery import score, score_dictionary, score_latents

CFG = GroundTruthConfig(
    d=32, ratio=4, active=3, alpha=1.0, hierarchies=4, children=2, child_prob=0.5, correlated_pairs=3,
    anticorrelated_pairs=3, correlation=0.8, offset=1.5, seed=0,
)  # fmt: skip


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def truth() -> GroundTruth:
    return generate(CFG)


@pytest.fixture(scope="module")
def samples(truth: GroundTruth) -> Samples:
    return truth.sample(40_000, seed=1)


# ------------------------------------------------------------------------------------------- the generator
def test_shapes_and_unit_directions(truth: GroundTruth, samples: Samples) -> None:
    assert truth.n_features == 128 and truth.d == 32
    assert torch.allclose(truth.directions.norm(dim=1), torch.ones(128), atol=1e-5)
    assert samples.x.shape == (40_000, 32) and samples.z.shape == (40_000, 128)
    assert bool((samples.z >= 0).all())
    fired = samples.z[samples.z > 0]
    assert float(fired.min()) >= CFG.magnitude_offset and float(fired.max()) < CFG.magnitude_offset + 1.0


def test_frequencies_follow_the_power_law(truth: GroundTruth, samples: Samples) -> None:
    nb = CFG.n_base
    rank = torch.arange(nb, dtype=torch.float64) + 1
    slope = torch.diff(truth.freq[:nb].double().log()) / torch.diff(rank.log())
    assert slope.tolist() == pytest.approx([-CFG.alpha] * (nb - 1), abs=1e-3)  # exactly (i+1)^-alpha below the cap
    emp = (samples.z > 0).double().mean(0)
    se = (truth.freq.double() * (1 - truth.freq.double()) / len(samples)).sqrt()
    assert bool(((emp - truth.freq.double()).abs() < 5 * se + 1e-4).all())  # every feature, within 5 sigma
    assert float((samples.z > 0).sum(1).double().mean()) == pytest.approx(CFG.active, rel=0.03)
    assert truth.expected_l0() == pytest.approx(CFG.active, rel=1e-4)


def test_a_child_never_fires_without_its_parent(truth: GroundTruth, samples: Samples) -> None:
    on = samples.z > 0
    assert len(truth.parents()) == CFG.hierarchies
    for p in truth.parents():
        kids = truth.children_of(p)
        assert len(kids) == CFG.children
        assert not bool((on[:, kids].any(1) & ~on[:, p]).any())  # never without the parent
        assert int(on[:, kids].sum(1).max()) == 1  # at most one child at a time
        p_child = float(on[:, kids].any(1)[on[:, p]].double().mean())
        assert p_child == pytest.approx(CFG.child_prob, abs=0.03)
        assert float(truth.freq[p]) > float(truth.freq[kids].max())  # parents are the frequent ones


def test_pairs_have_the_requested_sign(truth: GroundTruth, samples: Samples) -> None:
    on = samples.z > 0
    signs = [s for _, _, s in truth.pairs]
    assert signs.count(1) == CFG.correlated_pairs and signs.count(-1) == CFG.anticorrelated_pairs
    for a, b, sign in truth.pairs:
        p_b = float(on[:, b].double().mean())
        p_b_given_a = float(on[:, b][on[:, a]].double().mean())
        if sign > 0:
            assert p_b_given_a > 2 * p_b, (a, b)
        else:
            assert p_b_given_a < 0.5 * p_b, (a, b)
        assert float(on[:, b].double().mean()) == pytest.approx(float(truth.freq[b]), abs=0.01)  # marginals kept


def test_offset_and_noise(truth: GroundTruth) -> None:
    assert float(truth.bias.norm()) == pytest.approx(CFG.offset, rel=1e-5)
    noisy = generate(dataclasses.replace(CFG, noise=0.3))
    s = noisy.sample(4000, seed=3)
    resid = s.x - noisy.decode(s.z)
    assert float(resid.norm(dim=1).mean()) == pytest.approx(0.3, rel=0.05)
    clean = truth.sample(100, seed=3)
    assert torch.allclose(clean.x, truth.decode(clean.z), atol=1e-5)  # no noise by default


def test_same_seed_same_truth_and_samples() -> None:
    a, b = generate(CFG), generate(CFG)
    assert torch.equal(a.directions, b.directions) and torch.equal(a.freq, b.freq)
    assert torch.equal(a.sample(500, seed=4).x, b.sample(500, seed=4).x)
    assert torch.equal(a.activations(500, seed=4, chunk=128), a.sample(500, seed=4, chunk=128).x)


def test_toy_model_source() -> None:
    cfg = GroundTruthConfig(d=8, ratio=2, active=1, alpha=0.0, source="toy", toy_steps=400, seed=0)
    t = generate(cfg)
    rep = t.scorable
    assert int(rep.sum()) >= 8  # at least one feature per dimension is represented
    assert torch.allclose(t.directions[rep].norm(dim=1), torch.ones(int(rep.sum())), atol=1e-5)
    s = t.sample(2000, seed=1)
    r = score_latents(t, t.directions[rep], s, s.z[:, rep], t.decode(s.z))
    assert r.n_features == int(rep.sum()) and r.mmcs == pytest.approx(1.0, abs=1e-5)
    assert t.describe()["toy_represented"] == int(rep.sum())


# ------------------------------------------------------------------------------------------- scoring
def test_perfect_dictionary_scores_perfectly(truth: GroundTruth, samples: Samples) -> None:
    r = score_latents(truth, truth.directions, samples, samples.z, truth.decode(samples.z))
    assert r.mmcs == pytest.approx(1.0, abs=1e-5) and r.recovered == 1.0
    assert r.fvu is not None and r.fvu < 1e-9
    assert r.dead_frac == 0.0 and r.l0 == pytest.approx(CFG.active, rel=0.03)
    assert [d["recovered"] for d in r.deciles] == [1.0] * 10
    assert r.absorption == 0.0 and r.split_frac == 0.0 and r.split_latents == 1.0
    assert all(h.recall_alone == 1.0 and h.recall_with_child == 1.0 for h in r.hierarchies)


def test_deciles_go_from_frequent_to_rare(truth: GroundTruth, samples: Samples) -> None:
    r = score_latents(truth, truth.directions, samples, samples.z)
    assert r.fvu is None  # no reconstruction given
    assert sum(d["features"] for d in r.deciles) == truth.n_features
    assert all(a["freq_lo"] >= b["freq_hi"] for a, b in zip(r.deciles, r.deciles[1:], strict=False))


def test_random_dictionary_scores_low(truth: GroundTruth) -> None:
    g = torch.Generator().manual_seed(7)
    dec = F.normalize(torch.randn(truth.n_features, truth.d, generator=g), dim=1)
    r = score(truth, dec, lambda x: torch.relu(x @ dec.T - 1.0), lambda z: z @ dec, n_samples=4096)
    assert r.mmcs < 0.6 and r.recovered == 0.0
    assert max(d["recovered"] for d in r.deciles) == 0.0


def absorbing_dictionary(truth: GroundTruth, samples: Samples) -> tuple[torch.Tensor, torch.Tensor]:
    """By hand: each child's latent writes parent + child, and the parent's latent is silent whenever a child fires."""
    dec = truth.directions.clone()
    z = samples.z.clone()
    for p in truth.parents():
        kids = truth.children_of(p)
        for c in kids:
            dec[c] = F.normalize(truth.directions[p] + truth.directions[c], dim=0)
        z[(samples.z[:, kids] > 0).any(1), p] = 0.0
    return dec, z


def test_absorption_is_detected_on_a_planted_absorbing_dictionary(truth: GroundTruth, samples: Samples) -> None:
    dec, z = absorbing_dictionary(truth, samples)
    r = score_latents(truth, dec, samples, z)
    assert r.absorption == pytest.approx(1.0)
    for h in r.hierarchies:
        assert h.parent_latent == h.parent and h.recall_alone == 1.0 and h.recall_with_child == 0.0
        assert h.split_latents == 1 + CFG.children  # the parent's latent and one specialised latent per child
    assert r.split_frac == 1.0
    # half absorbed: the parent's latent still fires on half of the parent-and-child samples
    z_half = z.clone()
    for p in truth.parents():
        both = (samples.z[:, truth.children_of(p)] > 0).any(1) & (samples.z[:, p] > 0)
        idx = both.nonzero().flatten()[::2]
        z_half[idx, p] = samples.z[idx, p]
    assert score_latents(truth, dec, samples, z_half).absorption == pytest.approx(0.5, abs=0.02)


def test_score_takes_any_encode_function_and_matches_score_dictionary(truth: GroundTruth) -> None:
    from lmscope.dictionaries import build

    d = build(DictConfig(arch="topk", d_in=truth.d, d_sae=64, k=4), seed=0).eval()
    s = truth.sample(3000, seed=9)
    a = score_dictionary(truth, d, s)
    b = score(truth, d.decoder_directions.detach(), d.encode, d.decode, samples=s, batch_size=700)
    assert a.to_dict() == b.to_dict()
    assert a.d_sae == 64 and a.samples == 3000 and a.l0 == pytest.approx(4.0)


def test_recovery_benchmark_trains_and_scores_a_topk_dictionary() -> None:
    """Training recovers the frequent features and beats the untrained dictionary by far (rare ones lag: measured)."""
    from lmscope.dictionaries import build

    data = GroundTruthConfig(d=32, ratio=2, active=3, alpha=0.5, hierarchies=2, offset=1.0, noise=0.02, seed=1)
    cfg = RecoveryBenchConfig(data=data, train_samples=131_072, eval_samples=4096, batch_size=512)
    result = run_recovery(cfg, dictionary_configs(cfg, ["topk"]))
    (name,) = result.reports
    r = result.reports[name]
    assert name == "topk-m64-k3" and result.archs[name] == "topk"
    untrained = score_dictionary(result.truth, build(DictConfig(arch="topk", d_in=32, d_sae=64, k=3), seed=0))
    assert r.mmcs > 0.85 and r.mmcs > untrained.mmcs + 0.3, (r.line(), untrained.line())
    assert r.deciles[0]["recovered"] >= 0.8 and r.fvu is not None and r.fvu < 0.3, r.line()
    out = result.to_dict()
    assert out["runs"][name]["arch"] == "topk" and out["truth"]["n_features"] == 64
    assert len(out["runs"][name]["deciles"]) == 10


def test_the_truth_is_not_a_dictionary_initialisation() -> None:
    """The generator's streams are salted: a dictionary built with the data's seed does not start at the truth
    (an unsalted `manual_seed(seed)` draws the very same Gaussians as `build(cfg, seed)`)."""
    from lmscope.dictionaries import build

    t = generate(CFG)
    d = build(DictConfig(arch="topk", d_in=t.d, d_sae=t.n_features, k=3), seed=CFG.seed)
    r = score_latents(t, d.decoder_directions.detach(), t.sample(10, seed=0), torch.zeros(10, t.n_features))
    assert r.mmcs < 0.6


def test_every_architecture_gets_a_config() -> None:
    from lmscope.dictionaries import architectures

    cfgs = dictionary_configs(RecoveryBenchConfig(data=CFG, expansion=2.0))
    assert [c.arch for c in cfgs] == architectures()
    assert all(c.d_in == 32 and c.d_sae == 256 and c.k == 3 for c in cfgs)


# ------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(("change", "words"), [
    ({"active": 40}, "more active features than the dimension allows"),
    ({"active": 32}, "lower active below 32"),
    ({"ratio": 1, "max_freq": 0.05}, "cannot be generated"),
    ({"hierarchies": 40, "children": 3}, "need 172 features but there are 128"),
    ({"source": "gan"}, "unknown source 'gan'"),
    ({"source": "toy", "ratio": 0.5, "hierarchies": 0, "correlated_pairs": 0, "anticorrelated_pairs": 0},
     "toy model needs ratio >= 1"),
    ({"correlation": 1.0}, "correlation=1.0 is out of range"),
    ({"noise": -1.0}, "must be >= 0"),
    ({"alpha": -1.0}, "alpha=-1.0 is out of range"),
])  # fmt: skip
def test_bad_benchmark_configs_are_one_clear_line(change, words) -> None:
    with pytest.raises(GroundTruthError) as e:
        dataclasses.replace(CFG, **change)
    msg = str(e.value)
    assert words in msg and msg.startswith("ground truth:") and ";" in msg and "\n" not in msg


def test_bad_scoring_inputs(truth: GroundTruth, samples: Samples) -> None:
    with pytest.raises(SyntheticError, match="decoder has shape"):
        score_latents(truth, torch.zeros(10, 7), samples, samples.z)
    with pytest.raises(SyntheticError, match="encode returned shape"):
        score(truth, truth.directions, lambda x: torch.zeros(len(x), 3), n_samples=10)
    with pytest.raises(GroundTruthError, match="less than one batch"):
        RecoveryBenchConfig(data=CFG, train_samples=100, batch_size=512)


def test_cli_recovery(tmp_path) -> None:
    from typer.testing import CliRunner

    from lmscope.cli.app import app

    out = tmp_path / "rec"
    args = ["toy", "recovery", "--arch", "topk", "--d", "16", "--ratio", "2", "--active", "2", "--hierarchies", "2",
            "--correlated", "1", "--anticorrelated", "1", "--samples", "8192", "--device", "cpu", "--out", str(out),
            "--no-progress"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "MMCS" in result.output and (out / "recovery.json").is_file() and (out / "recovery_deciles.html").is_file()
    bad = CliRunner().invoke(app, ["toy", "recovery", "--d", "8", "--active", "9", "--out", str(out), "--no-progress"])
    assert bad.exit_code == 2 and "more active features than the dimension allows" in bad.output


# ------------------------------------------------------------------------------------------- benchmark options
def test_recovery_options_reach_the_trainer() -> None:
    """`dead_window_frac` and `train_options` (the ablations' knobs) set the trainer's config; bad ones are one line."""
    data = GroundTruthConfig(d=16, ratio=2, active=2, hierarchies=1, correlated_pairs=1, anticorrelated_pairs=1)
    cfg = RecoveryBenchConfig(data=data, train_samples=2048, eval_samples=512, batch_size=512, dead_window_frac=0.5,
                              train_options={"grad_clip": None, "b_dec_init": "mean"})  # fmt: skip
    result = run_recovery(cfg, dictionary_configs(cfg, ["topk"]))
    (d,) = result.dictionaries.values()
    train_cfg = d.metadata["training"]["train_cfg"]  # type: ignore[index]
    assert train_cfg["dead_window_tokens"] == 1024 and train_cfg["grad_clip"] is None
    assert train_cfg["b_dec_init"] == "mean" and train_cfg["warmup_steps"] == cfg.warmup_steps
    bad_inputs = [
        ({"dead_window_frac": 0.0}, "dead_window_frac=0.0 is out of range"),
        ({"train_options": {"lr": 1.0}}, "train_options ['lr'] are not TrainConfig fields"),
    ]
    for bad, words in bad_inputs:
        with pytest.raises(GroundTruthError) as e:
            dataclasses.replace(cfg, **bad)
        assert words in str(e.value) and "\n" not in str(e.value)


def test_a_run_does_not_depend_on_the_runs_beside_it() -> None:
    """Every architecture starts from the same initial draws: TopK trained alone, and trained after ReLU in the same
    benchmark, ends with the same weights (the trainer alone would seed run i with seed + i)."""
    data = GroundTruthConfig(d=16, ratio=2, active=2, hierarchies=1, seed=3)
    cfg = RecoveryBenchConfig(data=data, train_samples=2048, eval_samples=512, batch_size=512)
    alone = run_recovery(cfg, dictionary_configs(cfg, ["topk"]))
    beside = run_recovery(cfg, dictionary_configs(cfg, ["relu", "topk"]))
    (a,) = alone.dictionaries.values()
    b = next(d for name, d in beside.dictionaries.items() if beside.archs[name] == "topk")
    relu = next(d for name, d in beside.dictionaries.items() if beside.archs[name] == "relu")
    assert torch.equal(a.W_dec, b.W_dec) and torch.equal(a.W_enc, b.W_enc)
    assert not torch.equal(relu.W_dec, b.W_dec)  # trained differently, from the same draws
    assert alone.reports[next(iter(alone.reports))].mmcs == beside.reports[
        next(n for n in beside.reports if beside.archs[n] == "topk")
    ].mmcs


def _benchmark_script():
    import importlib.util
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "benchmarks"
    sys.path.insert(0, str(root))
    spec = importlib.util.spec_from_file_location("lmscope_recovery_bench", root / "recovery.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_recovery_benchmark_skips_absent_anchors_in_one_line(tmp_path) -> None:
    bench = _benchmark_script()
    line = bench.anchor_problem(tmp_path / "no-venv" / "bin" / "python")
    assert line is not None and "\n" not in line and "bash benchmarks/anchors_env.sh" in line and "missing" in line
    (tmp_path / "python").write_text("")
    assert bench.anchor_problem(tmp_path / "python") is None


def test_anchor_rows_are_the_benchmarks_rows_and_score_like_lmscope(tmp_path) -> None:
    """The rows written for the anchors are exactly run_recovery's training rows, and an anchor's output file (decoder,
    latents, reconstructions) scores exactly as the same dictionary scored by score_dictionary."""
    from safetensors.torch import save_file

    from lmscope.dictionaries import build

    bench = _benchmark_script()
    from anchors._common import open_acts

    t = generate(CFG)
    x = t.activations(3000, seed=CFG.seed + 1)
    bench.write_rows(tmp_path / "rows", x)
    assert torch.equal(open_acts(tmp_path / "rows"), x)
    d = build(DictConfig(arch="topk", d_in=t.d, d_sae=t.n_features, k=3), seed=5).eval()
    s = t.sample(2048, seed=CFG.seed + 2)
    with torch.no_grad():
        recon, z = d(s.x)
    save_file({"decoder": d.W_dec.detach().clone(), "latents": z, "recon": recon}, str(tmp_path / "a.safetensors"))
    got = bench.score_anchor(t, s, tmp_path / "a.safetensors")
    want = score_dictionary(t, d, s)
    for key in ("mmcs", "recovered", "fvu", "l0", "dead_frac", "absorption", "split_frac"):
        assert getattr(got, key) == pytest.approx(getattr(want, key), rel=1e-5, abs=1e-7), key
    assert [dc["recovered"] for dc in got.deciles] == [dc["recovered"] for dc in want.deciles]
