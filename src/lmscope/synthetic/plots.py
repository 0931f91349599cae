"""Figures of the toy-model experiments and the recovery benchmark, written as files.

Each figure is written as offline HTML (plotly.js embedded: the file opens without a network), the figure's
data as JSON beside it, and a PNG when kaleido is installed. `write_figure` returns the paths it wrote.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from lmscope.core.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text
from lmscope.synthetic.experiments import FRACTIONS, Dimensionality, PhaseDiagram, Transition
from lmscope.synthetic.recovery import RecoveryReport
from lmscope.synthetic.toy import DEDICATED, NOT_REPRESENTED, PHASES, REPRESENTED_NORM, SUPERPOSED

PHASE_COLORS = {NOT_REPRESENTED: "#d9d9d9", DEDICATED: "#1f77b4", SUPERPOSED: "#d62728"}


def write_figure(fig: go.Figure, out_dir: str | Path, stem: str, data: Mapping[str, Any]) -> list[Path]:
    """Write OUT/stem.html (self-contained), OUT/stem.json (`data`) and OUT/stem.png if kaleido can render it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    html, js = out / f"{stem}.html", out / f"{stem}.json"
    atomic_write_text(html, fig.to_html(include_plotlyjs=True, full_html=True), fsync=False)
    atomic_write_json(js, dict(data), fsync=False)
    paths = [html, js]
    try:
        png = fig.to_image(format="png", scale=2)
    except Exception:  # kaleido missing or unable to start: HTML and JSON are enough
        return paths
    atomic_write_bytes(out / f"{stem}.png", png, fsync=False)
    return [*paths, out / f"{stem}.png"]


def phase_figure(result: PhaseDiagram) -> go.Figure:
    """The extra feature's phase over (relative importance, density), as in Elhage et al.'s phase diagram."""
    code = {p: i for i, p in enumerate(PHASES)}
    z = [[code[p] for p in row] for row in result.phase]
    n = len(PHASES)
    scale = []
    for i, p in enumerate(PHASES):
        scale += [[i / n, PHASE_COLORS[p]], [(i + 1) / n, PHASE_COLORS[p]]]
    text = [
        [f"{p}<br>‖W‖ = {', '.join(f'{v:.2f}' for v in m.norms().tolist())}" for p, m in zip(row, mrow, strict=True)]
        for row, mrow in zip(result.phase, result.models, strict=True)
    ]
    fig = go.Figure(
        go.Heatmap(
            z=z, x=[math.log10(v) for v in result.importances], y=[math.log10(v) for v in result.densities],
            zmin=-0.5, zmax=n - 0.5, colorscale=scale, text=text, hoverinfo="text",
            colorbar={"tickvals": list(range(n)), "ticktext": list(PHASES), "title": "extra feature"},
        )
    )  # fmt: skip
    toy = result.config.toy
    fig.update_layout(
        title=f"Phase diagram: {toy.n_features} features in {toy.d_hidden} dimension(s), last feature's phase",
        xaxis_title="log10 relative importance of the extra feature",
        yaxis_title="log10 feature density (1 − S)",
        template="plotly_white",
    )
    return fig


def dims_figure(result: Dimensionality) -> go.Figure:
    """Left: each feature's dimensionality D_i over 1/(1−S), with the dimensions per feature and the known fractions.
    Right: the polytopes' measured mean D against the expected fraction."""
    fig = make_subplots(rows=1, cols=2, column_widths=[0.65, 0.35],
                        subplot_titles=("Feature dimensionality over sparsity", "Polytopes"))  # fmt: skip
    xs, ds, dpf_x, dpf = [], [], [], []
    for m in result.sweep:
        inv = 1.0 / (1.0 - m.setting.sparsity)
        rep = m.norms() >= REPRESENTED_NORM
        for v in m.dimensionality()[rep].tolist():
            xs.append(inv)
            ds.append(v)
        dpf_x.append(inv)
        dpf.append(min(1.0, m.W.shape[0] / max(1e-12, float(m.W.pow(2).sum()))))
    fig.add_trace(go.Scatter(x=xs, y=ds, mode="markers", name="D_i (represented features)",
                             marker={"size": 6, "opacity": 0.6}), row=1, col=1)  # fmt: skip
    fig.add_trace(go.Scatter(x=dpf_x, y=dpf, mode="lines+markers", name="dimensions per feature m/‖W‖²"), 1, 1)
    for name, v in FRACTIONS.items():
        fig.add_hline(y=v, line_dash="dot", line_color="#999", row=1, col=1,
                      annotation_text=f"{name} {_frac(v)}", annotation_position="right")  # fmt: skip
    names = [p.polytope.name for p in result.polytopes]
    fig.add_trace(go.Bar(x=names, y=[p.mean_dimensionality for p in result.polytopes], name="measured mean D"), 1, 2)
    fig.add_trace(go.Scatter(x=names, y=[p.polytope.expected for p in result.polytopes], mode="markers",
                             marker={"symbol": "line-ew-open", "size": 30, "line": {"width": 3}},
                             name="expected"), row=1, col=2)  # fmt: skip
    fig.update_xaxes(type="log", title_text="1 / (1 − S)", row=1, col=1)
    fig.update_yaxes(title_text="dimensionality", range=[0, 1.1], row=1, col=1)
    fig.update_yaxes(range=[0, 1.1], row=1, col=2)
    toy = result.config.toy
    fig.update_layout(title=f"Feature dimensionality (sweep: {toy.n_features} features in {toy.d_hidden} dims)",
                      template="plotly_white")  # fmt: skip
    return fig


def _frac(v: float) -> str:
    for den in range(1, 10):
        num = round(v * den)
        if abs(num / den - v) < 1e-9:
            return f"{num}/{den}" if den > 1 else str(num)
    return f"{v:.3f}"


def transition_figure(result: Transition) -> go.Figure:
    """Per sparsity: WᵀW (top) and ‖W_i‖ coloured by superposition (bottom), as in Elhage et al.'s figure."""
    models, k = result.models, len(result.models)
    titles = [f"S = {m.setting.sparsity:g}" for m in models]
    fig = make_subplots(rows=2, cols=k, subplot_titles=titles, vertical_spacing=0.08, row_heights=[0.45, 0.55])
    for j, m in enumerate(models, start=1):
        gram = (m.W.T @ m.W).tolist()
        fig.add_trace(go.Heatmap(z=gram, zmin=-1, zmax=1, colorscale="RdBu", reversescale=True, showscale=j == k,
                                 colorbar={"len": 0.4, "y": 0.8}), row=1, col=j)  # fmt: skip
        fig.update_yaxes(autorange="reversed", showticklabels=False, row=1, col=j)
        fig.update_xaxes(showticklabels=False, row=1, col=j)
        sup = [min(1.0, v) for v in m.superposition().tolist()]
        fig.add_trace(
            go.Bar(
                y=list(range(m.W.shape[1])), x=m.norms().tolist(), orientation="h", showlegend=False,
                marker={"color": sup, "colorscale": [[0, "#1f1f1f"], [1, "#f0c000"]], "cmin": 0, "cmax": 1},
            ),
            row=2, col=j,
        )  # fmt: skip
        fig.update_yaxes(autorange="reversed", row=2, col=j)
    fig.update_layout(
        title=(f"{models[0].W.shape[1]} features (importance {result.config.importance_decay}^i) in "
               f"{models[0].W.shape[0]} dims: represented {result.represented()}, superposed {result.superposed()}"),
        template="plotly_white", height=650,
    )  # fmt: skip
    return fig


def recovery_figure(reports: Mapping[str, RecoveryReport], title: str = "Ground-truth recovery") -> go.Figure:
    """Fraction of true features recovered per frequency decile, one bar group per dictionary."""
    fig = go.Figure()
    for name, r in reports.items():
        fig.add_trace(
            go.Bar(x=[f"D{d['decile']}" for d in r.deciles], y=[d["recovered"] for d in r.deciles],
                   name=f"{name} (MMCS {r.mmcs:.2f})")
        )  # fmt: skip
    threshold = next(iter(reports.values())).threshold if reports else 0.9
    fig.update_layout(
        barmode="group", template="plotly_white", title=title, yaxis={"range": [0, 1.05]},
        xaxis_title="frequency decile (D0: most frequent features)",
        yaxis_title=f"fraction recovered (cosine > {threshold:g})",
    )  # fmt: skip
    return fig
