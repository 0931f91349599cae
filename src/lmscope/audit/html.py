"""report.html: the audit as one self-contained page (no script, no network), with small inline SVG plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmscope.core.atomic import atomic_write_text
from lmscope.core.svg import svg_lines


def render(report: dict[str, Any]) -> str:
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(Path(__file__).parent / "templates")),
        autoescape=jinja2.select_autoescape(["html", "j2"]),
    )
    env.globals["svg_lines"] = svg_lines
    env.filters["r"] = lambda v, n=3: "—" if v is None else (f"{v:.{n}g}" if isinstance(v, float) else v)
    return str(env.get_template("report.html.j2").render(r=report))


def write_html(report: dict[str, Any], path: Path) -> Path:
    atomic_write_text(path, render(report))
    return path
