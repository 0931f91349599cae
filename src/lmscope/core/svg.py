"""Small inline SVG plots for self-contained HTML reports (no script, no network): the diff and audit pages."""

from __future__ import annotations

import math


def svg_lines(series: dict[str, list[float | None]], width: int = 520, height: int = 160, x0: int = 0,
              ylabel: str = "") -> str:  # fmt: skip
    """A small line plot: one polyline per named series (x = index + x0), with axes and a legend."""
    vals = [v for s in series.values() for v in s if v is not None and math.isfinite(v)]
    if not vals:
        return "<p>(no data)</p>"
    lo, hi = min(0.0, min(vals)), max(vals)
    hi = hi if hi > lo else lo + 1
    n = max(len(s) for s in series.values())
    pad = 34
    colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e"]

    def xy(i: int, v: float) -> str:
        x = pad + (width - 2 * pad) * (i / max(1, n - 1))
        y = height - pad + (-(height - 2 * pad) * (v - lo) / (hi - lo))
        return f"{x:.1f},{y:.1f}"

    parts = [f'<svg width="{width}" height="{height}" role="img" class="plot">',
             f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="#999"/>',
             f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" stroke="#999"/>',
             f'<text x="2" y="{pad - 6}" font-size="10">{hi:.3g}</text>',
             f'<text x="2" y="{height - pad}" font-size="10">{lo:.3g}</text>',
             f'<text x="{width - pad - 40}" y="{height - 8}" font-size="10">{x0 + n - 1}</text>',
             f'<text x="{pad}" y="{height - 8}" font-size="10">{x0} {ylabel}</text>']  # fmt: skip
    for k, (name, s) in enumerate(series.items()):
        c = colours[k % len(colours)]
        pts = " ".join(xy(i, v) for i, v in enumerate(s) if v is not None and math.isfinite(v))
        parts.append(f'<polyline fill="none" stroke="{c}" stroke-width="1.5" points="{pts}"/>')
        parts.append(f'<text x="{width - pad - 120}" y="{pad + 12 * k}" font-size="11" fill="{c}">{name}</text>')
    parts.append("</svg>")
    return "".join(parts)
