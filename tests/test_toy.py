"""Toy models of superposition (lmscope.synthetic.toy): the paper's qualitative results, on small seeded models.

Elhage et al. 2022, "Toy Models of Superposition": a ReLU-output model ReLU(WᵀW x + b) trained on sparse features.
Dense features: the single hidden dimension holds one feature's worth, the more important feature wins it. Sparse
features: both features share it antipodally (W_1·W_2 ≈ −1, each of dimensionality 1/2). Small models settle into
polytopes whose features have the dimensionalities 1/2 (digon), 2/3 (triangle) and 2/5 (pentagon). As sparsity
grows, more features are represented, in superposition.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from lmscope.cli.app import app
from lmscope.synthetic.errors import ToyConfigError
from lmscope.synthetic.experiments import (
    DimsConfig,
    PhaseConfig,
    TransitionConfig,
    dimensionality,
    nearest_fraction,
    phase_diagram,
    transition,
)
from lmscope.synthetic.toy import (
    DEDICATED,
    NOT_REPRESENTED,
    SUPERPOSED,
    ToyConfig,
    ToySetting,
    dimensions_per_feature,
    feature_norms,
    phases,
    superposition,
    train_toy,
)
from lmscope.synthetic.toy import dimensionality as dims_of

FAST = {"steps": 1500, "batch_size": 512, "restarts": 8}  # many restarts: local minima are common


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ------------------------------------------------------------------------------------------- the analyses, exactly
def polygon(n: int, radius: float = 1.0) -> torch.Tensor:
    a = torch.arange(n) * 2 * math.pi / n
    return torch.stack([torch.cos(a), torch.sin(a)]) * radius  # [2, n]


@pytest.mark.parametrize(("W", "expected"), [
    (torch.tensor([[1.0, -1.0]]), 1 / 2),  # digon
    (polygon(3), 2 / 3),  # triangle
    (polygon(5, 1.15), 2 / 5),  # pentagon (any scale)
    (torch.eye(3), 1.0),  # dedicated dimensions
])  # fmt: skip
def test_dimensionality_of_known_geometries(W: torch.Tensor, expected: float) -> None:
    assert torch.allclose(dims_of(W), torch.full((W.shape[1],), expected), atol=1e-5)
    assert nearest_fraction(expected)[1] == pytest.approx(expected)


def test_superposition_and_phases_of_a_hand_made_model() -> None:
    W = torch.tensor([[1.0, -1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.02]])  # a digon, a dedicated feature, an absent one
    assert feature_norms(W).tolist() == pytest.approx([1, 1, 1, 0.02])
    assert superposition(W)[:2].tolist() == pytest.approx([1, 1])
    assert phases(W) == [SUPERPOSED, SUPERPOSED, DEDICATED, NOT_REPRESENTED]
    assert dims_of(torch.zeros(2, 3)).tolist() == [0, 0, 0]  # unused features own no dimension
    assert dimensions_per_feature(W) == pytest.approx(2 / 3.0004, rel=1e-4)


# ------------------------------------------------------------------------------------- trained: 2 features in 1 dim
@pytest.fixture(scope="module")
def two_in_one() -> dict[str, object]:
    torch.set_num_threads(1)
    settings = {
        "dense_equal": ToySetting(0.0, (1.0, 1.0)),
        "dense_second_less": ToySetting(0.0, (1.0, 0.5)),
        "dense_second_more": ToySetting(0.0, (1.0, 2.0)),
        "sparse_equal": ToySetting(0.99, (1.0, 1.0)),
    }
    models = train_toy(ToyConfig(n_features=2, d_hidden=1, **FAST), list(settings.values()))
    return dict(zip(settings, models, strict=True))


def test_dense_features_one_dimension_holds_one_feature(two_in_one) -> None:
    """Dense, equal importance: the dimension holds one feature's worth (‖W‖_F² ≈ 1) and superposition buys nothing:
    the loss is that of keeping a single feature (1/12, the other predicted by its mean 1/2).

    Exactly at equal importance the direction is degenerate: a dedicated feature, or a mix of the two along one
    direction, lose within ~0.5% of each other (measured over seeds), so the test asks for one feature's worth, not
    for which one; unequal importances pick the winner (the next test)."""
    m = two_in_one["dense_equal"]
    assert float(m.W.pow(2).sum()) == pytest.approx(1.0, abs=0.08)
    assert m.loss == pytest.approx(1 / 12, rel=0.02)


@pytest.mark.parametrize(("name", "winner"), [("dense_second_less", 0), ("dense_second_more", 1)])
def test_dense_the_more_important_feature_wins(two_in_one, name: str, winner: int) -> None:
    m = two_in_one[name]
    norms = m.norms()
    assert float(norms[winner]) == pytest.approx(1.0, abs=0.05)
    assert float(norms[1 - winner]) < 0.1
    assert m.phases()[winner] == DEDICATED and m.phases()[1 - winner] == NOT_REPRESENTED


def test_sparse_features_are_superposed_antipodally(two_in_one) -> None:
    m = two_in_one["sparse_equal"]
    w1, w2 = float(m.W[0, 0]), float(m.W[0, 1])
    assert w1 * w2 == pytest.approx(-1.0, abs=0.1)  # antipodal: W_1·W_2 ≈ −1
    assert m.norms().tolist() == pytest.approx([1, 1], abs=0.1)
    assert m.dimensionality().tolist() == pytest.approx([0.5, 0.5], abs=0.03)
    assert m.phases() == [SUPERPOSED, SUPERPOSED]
    assert m.loss < 0.1 * (0.01 / 3)  # a tenth of the loss of keeping one feature (the other's E[x²] = density / 3)


# ------------------------------------------------------------------------------------------- polytopes and transition
def test_polytopes_have_the_known_fractional_dimensionalities() -> None:
    """Digon 1/2 (2 in 1), triangle 2/3 (3 in 2, moderate sparsity), pentagon 2/5 (5 in 2, sparse)."""
    toy = ToyConfig(steps=1200, batch_size=512)  # 24 restarts per polytope (DimsConfig.polytope_restarts)
    result = dimensionality(DimsConfig(toy=toy, sweep_densities=()))
    got = {p.polytope.name: p for p in result.polytopes}
    for name, expected in [("digon", 1 / 2), ("triangle", 2 / 3), ("pentagon", 2 / 5)]:
        p = got[name]
        assert p.represented == p.polytope.n_features, name
        assert p.mean_dimensionality == pytest.approx(expected, abs=0.03), name
        assert p.nearest == name
        assert p.model.dimensionality().tolist() == pytest.approx([expected] * p.polytope.n_features, abs=0.06)


def test_five_features_in_two_dims_form_a_pentagon() -> None:
    (m,) = train_toy(ToyConfig(n_features=5, d_hidden=2, **FAST), [ToySetting.decaying(5, 0.95)])
    angles = torch.atan2(m.W[1], m.W[0]).sort().values
    gaps = torch.diff(torch.cat([angles, angles[:1] + 2 * math.pi]))
    assert gaps.tolist() == pytest.approx([2 * math.pi / 5] * 5, abs=0.1)  # five equally spaced directions
    assert m.dimensionality().mean().item() == pytest.approx(0.4, abs=0.02)


def test_transition_more_features_superposed_as_sparsity_grows() -> None:
    """5 features of importance 0.9^i in 2 dims (the paper's first figure): dense, the 2 most important each get a
    dimension; sparse, all 5 are represented in superposition (a pentagon)."""
    toy = ToyConfig(n_features=5, d_hidden=2, **FAST)
    result = transition(TransitionConfig(toy=toy, importance_decay=0.9, sparsities=(0.0, 0.8, 0.95)))
    assert result.models[0].phases() == [DEDICATED, DEDICATED, NOT_REPRESENTED, NOT_REPRESENTED, NOT_REPRESENTED]
    rep, sup = result.represented(), result.superposed()
    assert rep == sorted(rep) and rep[0] == 2 and rep[-1] == 5
    assert sup[0] == 0 and sup[-1] == 5
    assert result.to_dict()["dims_per_feature"][-1] < 0.5


# ------------------------------------------------------------------------------------------- the phase diagram
@pytest.fixture(scope="module")
def small_phase_diagram():
    torch.set_num_threads(1)
    toy = ToyConfig(n_features=2, d_hidden=1, **FAST)
    return phase_diagram(PhaseConfig(toy=toy, grid=2, importance_range=(0.5, 2.0), density_range=(1.0, 0.01)))


def test_phase_diagram_corners(small_phase_diagram) -> None:
    """Dense: the extra feature is dropped when less important, dedicated when more; sparse: superposed."""
    r = small_phase_diagram
    assert r.densities == pytest.approx([1.0, 0.01]) and r.importances == pytest.approx([0.5, 2.0])
    assert r.phase == [[NOT_REPRESENTED, DEDICATED], [SUPERPOSED, SUPERPOSED]]


def test_figures_are_written_as_offline_html_and_json(small_phase_diagram, tmp_path) -> None:
    from lmscope.synthetic.plots import phase_figure, write_figure

    paths = write_figure(phase_figure(small_phase_diagram), tmp_path, "phase", small_phase_diagram.to_dict())
    html = (tmp_path / "phase.html").read_text()
    assert "plotly" in html and "cdn.plot.ly" not in html.split("<script")[1][:200]  # plotly.js is inlined
    data = json.loads((tmp_path / "phase.json").read_text())
    assert data["phase"] == small_phase_diagram.phase
    assert {p.name for p in paths} >= {"phase.html", "phase.json"}


# ------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(("kwargs", "words"), [
    ({"n_features": 2, "d_hidden": 3}, "d_hidden=3"),
    ({"n_features": 0}, "n_features=0"),
    ({"steps": 0}, "steps=0"),
    ({"lr": -1.0}, "lr=-1.0"),
    ({"restarts": 0}, "restarts=0"),
])  # fmt: skip
def test_out_of_range_toy_config_is_one_clear_line(kwargs, words) -> None:
    with pytest.raises(ToyConfigError) as e:
        ToyConfig(**kwargs)
    msg = str(e.value)
    assert words in msg and "out of range" in msg and "must be" in msg and "\n" not in msg


@pytest.mark.parametrize(("setting", "words"), [
    (ToySetting(1.0, (1.0, 1.0)), "sparsity=1.0"),
    (ToySetting(-0.1, (1.0, 1.0)), "sparsity=-0.1"),
    (ToySetting(0.5, (1.0, 0.0)), "importance 0.0"),
    (ToySetting(0.5, (1.0,)), "1 importances for 2 features"),
])  # fmt: skip
def test_out_of_range_toy_setting_is_one_clear_line(setting, words) -> None:
    with pytest.raises(ToyConfigError, match="toy model") as e:
        train_toy(ToyConfig(n_features=2, d_hidden=1, steps=1), [setting])
    assert words in str(e.value) and "\n" not in str(e.value)


def test_cli_toy_commands(tmp_path) -> None:
    runner = CliRunner()
    for sub in ("phase", "dims", "transition", "recovery"):
        result = runner.invoke(app, ["toy", sub, "--help"])
        assert result.exit_code == 0 and "Examples" in result.output, sub
    out = tmp_path / "t"
    args = ["toy", "transition", "--features", "3", "--hidden", "2", "--sparsities", "0,0.9", "--steps", "200",
            "--restarts", "1", "--out", str(out), "--no-progress"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert (out / "transition.html").is_file() and (out / "transition.json").is_file()
    bad = runner.invoke(app, ["toy", "phase", "--features", "2", "--hidden", "3", "--out", str(out), "--no-progress"])
    assert bad.exit_code == 2
    assert "d_hidden=3 is out of range" in bad.output and "Traceback" not in bad.output
    bad = runner.invoke(app, ["toy", "transition", "--sparsities", "0,1", "--out", str(out), "--no-progress"])
    assert bad.exit_code == 2 and "sparsity=1.0 is out of range" in bad.output
