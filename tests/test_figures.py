"""Every figure in README.md and docs/*.md cites where it comes from (benchmarks/figures.py).

A figure is a measured-looking number (a number with a unit, after a metric name, or in a table column headed by
one); it must sit under a `<!-- source: ... -->` comment naming a benchmark's JSON and command, a test, the
command whose output it is, or why it is not a measurement. See benchmarks/figures.py for the convention.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def figures() -> ModuleType:
    spec = importlib.util.spec_from_file_location("lmscope_doc_figures", ROOT / "benchmarks" / "figures.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


def _doc(tmp_path: Path, text: str) -> Path:
    (tmp_path / "benchmarks").mkdir(exist_ok=True)
    (tmp_path / "benchmarks" / "speed.py").write_text('OUT = "results/speed.json"\n')
    (tmp_path / "tests").mkdir(exist_ok=True)
    (tmp_path / "tests" / "test_speed.py").write_text("def test_fast():\n    pass\n")
    path = tmp_path / "doc.md"
    path.write_text(text)
    return path


def _found(figures: ModuleType, tmp_path: Path, text: str) -> list[tuple[str, bool]]:
    figs, _ = figures.scan(_doc(tmp_path, text), tmp_path)
    return [(f.text, f.source is not None and not f.source.problems) for f in figs]


def test_every_doc_figure_cites_a_valid_source(figures: ModuleType) -> None:
    found, sources = figures.collect(ROOT)
    assert len(found) > 50, "the detector finds the docs' figures at all"
    bad = [f"{s.path}:{s.line}: {s.text!r}: {'; '.join(s.problems)}" for s in sources if s.problems]
    assert not bad, "source comments that do not check out:\n" + "\n".join(bad)
    uncited = [f"{f.path}:{f.line}: {f.text!r} in {f.context!r}" for f in found if f.source is None]
    assert not uncited, (
        "figures in the docs with no <!-- source: ... --> comment above them in their section (see "
        "benchmarks/figures.py; run it with --uncited):\n" + "\n".join(uncited)
    )


def test_figures_are_found_and_cleared_by_a_source(figures: ModuleType, tmp_path: Path) -> None:
    text = (
        "# Speed\n\nIt trains at 15,949 tok/s, 0.61 of the ceiling, 1.44× sparsify; FVU 0.316 after 2M tokens.\n\n"
        "## Measured\n\n<!-- source: benchmarks/results/speed.json from `python benchmarks/speed.py --n 3` -->\n\n"
        "| run | tokens/s | note |\n| --- | --- | --- |\n| a | 3,296 | x |\n\nAnd 7 min 18 s, 3.0 GB peak.\n\n"
        "## Next\n\nHere 12 ms is uncited again.\n"
    )
    got = _found(figures, tmp_path, text)
    assert ("15,949 tok/s", False) in got
    assert ("1.44×", False) in got
    assert any(t.startswith("FVU 0.316") and not ok for t, ok in got)
    assert ("3,296 (tokens/s)", True) in got  # a bare number in a column headed by a unit
    assert ("3.0 GB", True) in got and ("18 s", True) in got
    assert ("12 ms", False) in got  # a heading ends the source's reach


def test_what_is_not_a_figure(figures: ModuleType, tmp_path: Path) -> None:
    text = (
        "# Setup\n\ntorch 2.13.0 and sae-lens 6.54.12, measured 2026-11-21 08:53 UTC, on Python 3.11.\n"
        "Run `lmscope harvest --tokens 20M --batch-size 32` with d_sae 4608 (8 × 576), k 32, blocks.6, m4608.\n"
        "Target: p95 < 100 ms; FVU < 0.3, dead < 5% and CE recovered > 0.8; at least 10% of it.\n\n"
        "```console\n$ lmscope train --tokens 300k --epochs 4 --timeout 30s\n```\n\n"
        "```python\nx = run(seconds=5)  # 12 ms\n```\n\nCite with `<!-- source: ... -->` above a figure.\n"
    )
    assert _found(figures, tmp_path, text) == []
    _, sources = figures.scan(tmp_path / "doc.md", tmp_path)
    assert sources == []  # a comment shown in inline code is not a source comment


def test_transcripts_and_sources_are_checked(figures: ModuleType, tmp_path: Path) -> None:
    text = (
        "# Out\n\n<!-- source: output of `lmscope eval m --dict d` -->\n\n"
        "```text\nFVU 0.164  27,169 tok/s\n│ fvu                   │ 0.1694      │\n```\n\n"
        "## Bad\n\n<!-- source: benchmarks/results/none.json from `python benchmarks/missing.py` -->\n\n"
        "It took 5 s.\n\n## Tested\n\n<!-- source: tests/test_speed.py::test_fast -->\n\nIt takes 2 s.\n\n"
        "## Wrong test\n\n<!-- source: tests/test_speed.py::test_slow -->\n\nIt takes 3 s.\n\n"
        "## Arithmetic\n\n<!-- source: not measured: d_sae x 4 bytes -->\n\nAbout 140 MB.\n"
    )
    got = dict(_found(figures, tmp_path, text))
    assert got["FVU 0.164"] and got["27,169 tok/s"] and got["0.1694 (table cell)"]
    assert not got["5 s"]  # the script it names does not exist
    assert got["2 s"]
    assert not got["3 s"]  # no such test
    assert got["140 MB"]
    _, sources = figures.scan(tmp_path / "doc.md", tmp_path)
    assert [s.kinds for s in sources] == [["output"], ["benchmark"], ["test"], ["test"], ["not measured"]]
    assert [bool(s.problems) for s in sources] == [False, True, False, True, False]
