"""The import-layer contract (docs/architecture.md): dependencies point one way, and no module cycle hides anywhere.

Every `import` of every module under src/lmscope is read from the source, function-level (lazy) imports included,
because a lazy import hides a dependency from the reader but not from the design. `make lint` runs this file.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"

# Lowest layer first. A module may import from its own layer's package and from lower layers only; packages that
# share a layer are siblings and must not import each other.
LAYERS: list[set[str]] = [
    {"lmscope._version", "lmscope._compat", "lmscope.errors", "lmscope.core"},
    {"lmscope.model"},
    {"lmscope.corpora"},
    {"lmscope.activations"},
    {"lmscope.dictionaries"},
    {"lmscope.training"},
    {"lmscope.synthetic", "lmscope.organisms", "lmscope.universality"},
    {"lmscope.atlas"},
    {"lmscope.explain", "lmscope.steer", "lmscope.circuits", "lmscope.diff", "lmscope.audit"},
    {"lmscope.workflows"},
    {"lmscope.web"},
    {"lmscope.cli"},
]
FACADE = "lmscope"  # lmscope/__init__.py re-exports the model layer; nothing inside the package imports it


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted((SRC / "lmscope").rglob("*.py"))}


def imports_of(path: Path, name: str, known: set[str]) -> list[tuple[str, int]]:
    """(imported lmscope module, line) for every import statement in the file, at any depth."""
    is_pkg = path.name == "__init__.py"
    out: list[tuple[str, int]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names if a.name.split(".")[0] == "lmscope"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import: resolve against this module's package
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "lmscope":
                continue
            for alias in node.names:  # `from pkg import submodule` depends on the submodule itself
                sub = f"{target}.{alias.name}"
                out.append((sub if sub in known else target, node.lineno))
    return out


def layer_of(module: str) -> tuple[int, str] | None:
    for i, group in enumerate(LAYERS):
        for pkg in group:
            if module == pkg or module.startswith(pkg + "."):
                return i, pkg
    return None


def graph() -> dict[str, list[tuple[str, int]]]:
    mods = all_modules()
    known = set(mods)
    return {m: [(t, ln) for t, ln in imports_of(p, m, known) if t in known] for m, p in mods.items()}


def test_every_module_has_a_layer() -> None:
    orphans = [m for m in all_modules() if m != FACADE and layer_of(m) is None]
    assert not orphans, f"modules outside every layer (add them to LAYERS and docs/architecture.md): {orphans}"


def test_dependencies_point_down() -> None:
    bad = []
    for mod, deps in graph().items():
        if mod == FACADE:
            continue
        here = layer_of(mod)
        assert here is not None
        for dep, line in deps:
            if dep == FACADE:
                bad.append(f"{mod}:{line} imports the facade `lmscope`; import the defining module instead")
                continue
            there = layer_of(dep)
            assert there is not None
            if there[0] > here[0]:
                bad.append(f"{mod}:{line} imports {dep}, a higher layer ({there[1]} above {here[1]})")
            elif there[0] == here[0] and there[1] != here[1]:
                bad.append(f"{mod}:{line} imports {dep}: {here[1]} and {there[1]} are siblings")
    assert not bad, "layer violations:\n" + "\n".join(bad)


def find_cycles(edges: dict[str, list[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each a cycle of imports."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = 0

    def visit(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, []):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in edges.get(v, []):
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles_even_lazy() -> None:
    edges = {m: sorted({d for d, _ in deps if d != m}) for m, deps in graph().items() if m != FACADE}
    cycles = find_cycles(edges)
    assert not cycles, f"import cycles (lazy imports included): {cycles}"


def test_library_never_imports_cli_or_web_and_never_renders() -> None:
    bad = []
    for mod, path in all_modules().items():
        if mod.startswith(("lmscope.cli", "lmscope.web")) or mod == FACADE:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            for n in names:
                if n.split(".")[0] in ("rich", "typer") or n.startswith(("lmscope.cli", "lmscope.web")):
                    bad.append(f"{mod}:{node.lineno} imports {n}")
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                bad.append(f"{mod}:{node.lineno} calls print(); report through a progress callback or return data")
    assert not bad, "the library must report, not render:\n" + "\n".join(bad)


@pytest.mark.parametrize(
    ("edges", "expected"),
    [({"a": ["b"], "b": ["a"]}, [["a", "b"]]), ({"a": ["b"], "b": ["c"], "c": []}, []), ({"a": ["a"]}, [["a"]])],
)
def test_cycle_finder_finds_cycles(edges: dict[str, list[str]], expected: list[list[str]]) -> None:
    assert find_cycles(edges) == expected


def test_the_checker_sees_lazy_imports(tmp_path: Path) -> None:
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from lmscope.cli.app import app\n    return app\n")
    assert imports_of(f, "lmscope.m", {"lmscope.cli.app"}) == [("lmscope.cli.app", 2)]
