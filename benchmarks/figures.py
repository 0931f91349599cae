"""Every figure quoted in the docs, with the source it cites; figures that cite none are reported.

    .venv/bin/python benchmarks/figures.py              # list every figure in README.md and docs/*.md
    .venv/bin/python benchmarks/figures.py --uncited    # only those without a source (exit 1 if any)
    .venv/bin/python benchmarks/figures.py --results    # each cited JSON: present? its date and command

A *figure* is a measured-looking number: a number with a unit (tok/s, tokens/s, GFLOP/s, s, ms, min, MB, GB,
GiB, %, a ratio such as 6.0x), a number after a metric name (FVU, CE, KL, L0, AUROC, perplexity, detection,
fuzzing, p50/p95, mean, median, r =, ...), or a number in a table column whose header is a unit or a metric.
Not figures: numbers in inline code and in commands (lines starting with `$`, and whole bash/python/json code
blocks), versions (1.2.3), dates and clock times, numbers inside identifiers (m4608, blocks.6), and thresholds
(a number after <, >, <=, >=, "under", "below", "above", "at least", "at most", "up to", "target").

The convention: a figure is covered by the nearest source comment above it in the same section (a comment
covers everything up to the next heading or the next source comment):

    <!-- source: benchmarks/results/NAME.json from `COMMAND` -->    a benchmark that writes JSON
    <!-- source: tests/test_x.py[::test_name] -->                   a test that checks it
    <!-- source: output of `COMMAND` -->                            a transcript of what COMMAND printed
    <!-- source: not measured: REASON -->                           e.g. arithmetic, a setting, an example

Several sources are separated by " ; ". A source is checked: a benchmark's script (the first benchmarks/*.py in
COMMAND) must exist and mention NAME, or COMMAND must name the JSON (e.g. with --out); a test file (and test
name) must exist; a transcript needs a command; a "not measured" needs a reason. tests/test_figures.py fails on
any figure without a valid source.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

NUM = r"(?<![\w.\-/])\d[\d,]*(?:\.\d+)?(?:e-?\d+)?"
_UNITS = (
    r"tok(?:ens)?/s|tokens per second|[GT]FLOP/s|it/s|ms/step|ms|µs|s|sec|seconds?|min(?:utes?)?|hours?"
    r"|[KMGT]i?B|%"
)
UNIT_RE = re.compile(rf"(~?{NUM})(?:\s?(?:{_UNITS})(?![\w/])|[×x](?![\w.]))")
METRICS = (
    r"FVU|fvu|CE loss recovered|CE recovered|ce_recovered|CE|ce_clean|ce_spliced|ce_zero_ablate|KL|kl_spliced|L0|l0"
    r"|AUROC|perplexity|perplexities|detection|fuzzing|rule-detection|accuracy|correlation|cosine|rel_bias"
    r"|dead|dead_frac|p10|p50|p90|p95|mean|median|confidence|r\s*=|speed-?up|ratio"
)
# a metric name, then at most 14 characters that are no digit, no markdown cell border and no word that starts a
# count ("FVU after 44 steps", "KL on 8,192 tokens"), then the number; a rich table's "│" may be crossed
_GAP = r"(?:(?!\b(?:after|on|of|over|feature|steps?|in)\b)[^\d\n|┃]){0,14}?"
METRIC_RE = re.compile(rf"(?<![\w-])(?:{METRICS})(?![\w-]){_GAP}({NUM})")
HEADER_RE = re.compile(rf"(?<![\w-])(?:{_UNITS}|{METRICS}|tokens/s|seconds|value)(?![\w-])", re.I)
BARE_CELL = re.compile(rf"^\**~?({NUM})\**(?:\s*\(.*\))?$")
THRESHOLD_RE = re.compile(
    r"(?:[<>≤≥]=?|\b(?:under|below|above|at least|at most|up to|target|exceeds?|over the last|the last|"
    r"the first|warmup|to twice)\b)\W{0,3}~?$",
    re.I,
)
VERSION_RE = re.compile(r"\d+\.\d+\.\d+|\d{4}-\d{2}-\d{2}|\d{1,2}:\d{2}(?::\d{2})?")
SOURCE_RE = re.compile(r"<!--\s*source:\s*(.*?)\s*-->", re.S)
CODE_LANGS = {"bash", "sh", "shell", "python", "py", "json", "toml", "yaml", "ini", "makefile"}


@dataclass
class Source:
    text: str
    line: int
    path: str = ""
    kinds: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


@dataclass
class Figure:
    path: str
    line: int
    text: str
    context: str
    source: Source | None


def check_source(text: str, line: int, root: Path = ROOT) -> Source:
    """Parse and check one source comment's items (see the module docstring)."""
    src = Source(text=" ".join(text.split()), line=line)
    for item in (i.strip() for i in src.text.split(" ; ")):
        if m := re.match(r"(benchmarks/results/[\w.\-/]+\.json) from `([^`]+)`", item):
            src.kinds.append("benchmark")
            stem = Path(m.group(1)).stem
            scripts = re.findall(r"benchmarks/[\w\-/]+\.py", m.group(2))
            if not scripts:
                src.problems.append(f"no benchmarks/*.py script in the command `{m.group(2)}`")
            elif not (root / scripts[0]).is_file():
                src.problems.append(f"{scripts[0]} does not exist")
            elif stem not in (root / scripts[0]).read_text() and m.group(1) not in m.group(2):
                src.problems.append(f"{scripts[0]} never mentions {stem}, and the command does not name it")
        elif m := re.match(r"(tests/[\w\-/]+\.py)(?:::(\w+))?$", item):
            src.kinds.append("test")
            test = root / m.group(1)
            if not test.is_file():
                src.problems.append(f"{m.group(1)} does not exist")
            elif m.group(2) and f"def {m.group(2)}(" not in test.read_text():
                src.problems.append(f"{m.group(1)} has no test {m.group(2)}")
        elif re.match(r"output of `[^`]+`", item):
            src.kinds.append("output")
        elif m := re.match(r"not measured:\s*(.*)$", item):
            src.kinds.append("not measured")
            if len(m.group(1)) < 5:
                src.problems.append("'not measured:' needs a reason")
        else:
            src.problems.append(f"unrecognised source {item!r}")
    return src


def _strip_inline(line: str) -> str:
    """Prose without inline code, links' targets and HTML comments (each replaced by spaces)."""
    line = re.sub(r"`[^`]*`", lambda m: " " * len(m.group(0)), line)
    line = re.sub(r"\]\([^)]*\)", lambda m: "]" + " " * (len(m.group(0)) - 1), line)
    return re.sub(r"<!--.*?-->", lambda m: " " * len(m.group(0)), line)


def _cells(line: str) -> list[str]:
    return [c.strip() for c in re.split(r"[|│┃]", line.strip().strip("|│┃"))]


def _is_table(line: str) -> bool:
    return line.lstrip().startswith(("|", "│", "┃"))


def figures_in_line(line: str, header: list[str] | None, output: bool = False) -> list[tuple[int, str]]:
    """(position, figure text) of the figures in one line of prose or output. `header` is its markdown table's
    header: a bare number is a figure in a column headed by a unit or a metric. In program output (`output`),
    every bare number in a table cell is one."""
    found: dict[int, str] = {}
    masked = VERSION_RE.sub(lambda m: " " * len(m.group(0)), line)

    def keep(start: int, text: str) -> None:
        before = masked[max(0, start - 20) : start]
        if not THRESHOLD_RE.search(before):
            found.setdefault(start, text)

    for m in UNIT_RE.finditer(masked):
        keep(m.start(1), m.group(0).strip())
    for m in METRIC_RE.finditer(masked):
        keep(m.start(1), m.group(0).strip())
    if (header is not None or output) and _is_table(masked):
        for col, cell in enumerate(_cells(masked)):
            if not (m := BARE_CELL.match(cell)):
                continue
            if output:
                keep(masked.index(cell), f"{m.group(1)} (table cell)")
            elif header is not None and col < len(header) and HEADER_RE.search(header[col]):
                keep(masked.index(cell), f"{m.group(1)} ({header[col]})")
    return sorted(found.items())


def scan(path: Path, root: Path = ROOT) -> tuple[list[Figure], list[Source]]:
    """The figures of one markdown file, each with the source comment covering it, and every source comment."""
    rel = path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    # source comments (outside code fences), by starting line; a comment may span lines
    fence: str | None = None
    lang = ""
    current: Source | None = None
    sources: list[Source] = []
    figures: list[Figure] = []
    header: list[str] | None = None
    in_comment = ""
    comment_line = 0
    for i, raw in enumerate(lines, 1):
        stripped = raw.strip()
        if fence is None and (m := re.match(r"^(```+|~~~+)\s*([\w+-]*)", stripped)):
            fence, lang, header = m.group(1), m.group(2).lower(), None
            continue
        if fence is not None:
            if stripped.startswith(fence) and stripped.strip("`~") == "":
                fence, header = None, None
                continue
            if lang in CODE_LANGS or stripped.startswith(("$", ">>>", "#", "...")):
                continue
            if "┃" in raw:
                header = _cells(raw)
                continue
            body: str = raw
        else:
            # a comment shown in inline code (`<!-- ... -->`) is no comment
            if in_comment or "<!--" in re.sub(r"`[^`]*`", "", raw):
                in_comment += raw + "\n"
                if "-->" not in raw:
                    if not in_comment.strip().startswith("<!--"):
                        in_comment = ""
                    else:
                        comment_line = comment_line or i
                    continue
                if m := SOURCE_RE.search(in_comment):
                    current = check_source(m.group(1), comment_line or i, root)
                    current.path = rel
                    sources.append(current)
                in_comment, comment_line = "", 0
            if re.match(r"^#{1,6}\s", raw):
                current, header = None, None
                continue
            if not stripped:
                header = None
                continue
            if _is_table(raw):
                if header is None:
                    header = _cells(raw)
                    continue
                if re.fullmatch(r"[|:\-\s]+", stripped):
                    continue
            body = _strip_inline(raw)
        for _start, fig in figures_in_line(body, header, output=fence is not None):
            figures.append(Figure(rel, i, fig, stripped[:160], current))
    return figures, sources


def doc_files(root: Path = ROOT) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def collect(root: Path = ROOT) -> tuple[list[Figure], list[Source]]:
    figures: list[Figure] = []
    sources: list[Source] = []
    for path in doc_files(root):
        f, s = scan(path, root)
        figures += f
        sources += s
    return figures, sources


def source_files(sources: list[Source], root: Path = ROOT) -> list[dict[str, str | None]]:
    """Each cited benchmark JSON: whether it is present here, and the date and command it records."""
    out = []
    for path in sorted({p for s in sources for p in re.findall(r"benchmarks/results/[\w.\-/]+\.json", s.text)}):
        f = root / path
        info: dict[str, str | None] = {"json": path, "present": str(f.is_file()), "date": None, "command": None}
        if f.is_file():
            try:
                data = json.loads(f.read_text())
                info["date"], info["command"] = data.get("date"), data.get("command")
            except (ValueError, AttributeError):
                info["present"] = "unreadable"
        out.append(info)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--uncited", action="store_true", help="only figures without a valid source")
    ap.add_argument("--results", action="store_true", help="list the cited benchmark JSON files")
    ap.add_argument("--json", action="store_true", help="print JSON")
    args = ap.parse_args()
    figures, sources = collect()
    bad_sources = [s for s in sources if s.problems]
    uncited = [f for f in figures if f.source is None or f.source.problems]
    if args.results:
        rows = source_files(sources)
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            for r in rows:
                print(f"{r['json']}: present {r['present']}, date {r['date']}, command {r['command']}")
        return 0
    shown = uncited if args.uncited else figures
    if args.json:
        print(json.dumps([{"file": f.path, "line": f.line, "figure": f.text,
                           "source": f.source.text if f.source else None,
                           "kinds": f.source.kinds if f.source else []} for f in shown], indent=2))  # fmt: skip
    else:
        for f in shown:
            where = f"{f.source.text}" if f.source else "CITES NOTHING"
            print(f"{f.path}:{f.line}  {f.text}  <- {where}")
        for s in bad_sources:
            print(f"{s.path}:{s.line}: bad source comment {s.text!r}: {'; '.join(s.problems)}", file=sys.stderr)
        print(f"{len(figures)} figures in {len(doc_files())} files; {len(uncited)} without a valid source; "
              f"{len(sources)} source comments, {len(bad_sources)} invalid", file=sys.stderr)  # fmt: skip
    return 1 if uncited or bad_sources else 0


if __name__ == "__main__":
    sys.exit(main())
