"""The browser tests' gate (tests/browser_gate.py) and `make browser`: in CI (CI=true) a missing Playwright or
Chromium, or a Chromium that will not start, fails; elsewhere it skips, saying why. CI here does have Chromium, so
the failing paths are checked with a Chromium that is not there, or is a stub that will not start."""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import browser_gate as gate

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("value", "ci"),
    [("true", True), ("True", True), ("1", True), ("yes", True), (" true ", True), ("false", False), ("0", False),
     ("", False), (None, False)],
)  # fmt: skip
def test_in_ci(value: str | None, ci: bool) -> None:
    assert gate.in_ci({} if value is None else {"CI": value}) is ci


def test_chromium_path(tmp_path: Path) -> None:
    assert gate.chromium_path({"LMSCOPE_CHROMIUM": "/opt/c/chrome", "PATH": str(tmp_path)}) == "/opt/c/chrome"
    assert gate.chromium_path({"PATH": str(tmp_path)}) == "/usr/bin/chromium"  # nothing on PATH: Debian's
    exe = tmp_path / "chromium"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    assert gate.chromium_path({"PATH": str(tmp_path)}) == str(exe)


def test_problem_names_what_is_missing_and_how_to_install_it(tmp_path: Path) -> None:
    exe = tmp_path / "chromium"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    assert gate.problem(None, str(exe)) is None
    why = gate.problem("No module named 'playwright'", str(exe))
    assert why is not None and "Playwright" in why and "No module named 'playwright'" in why
    assert "pip install -e '.[dev]'" in why
    why = gate.problem(None, str(tmp_path / "nothing"))
    assert why is not None and f"no Chromium at {tmp_path / 'nothing'}" in why
    assert "make browser" in why and "LMSCOPE_CHROMIUM" in why
    exe.chmod(0o644)
    why = gate.problem(None, str(exe))
    assert why is not None and "not executable" in why and "make browser" in why
    assert gate.problem(None, str(tmp_path)) is not None  # a directory is no Chromium
    why = gate.launch_problem("/usr/bin/chromium", RuntimeError("BrowserType.launch: crashed\nlong log ..."))
    assert "/usr/bin/chromium would not start (BrowserType.launch: crashed)" in why and "long log" not in why


def test_decide_fails_in_ci_and_skips_elsewhere() -> None:
    why = "no Chromium at /x: install it"
    for env in ({"CI": "true"}, {"CI": "1"}):
        action, message = gate.decide(why, env)
        assert action == "fail" and why in message and "CI=true" in message
    for env in ({}, {"CI": "false"}, {"CI": ""}):
        action, message = gate.decide(why, env)
        assert action == "skip" and why in message and message.startswith("browser tests skipped")
    assert gate.decide(None, {"CI": "true"}) == ("run", "") and gate.decide(None, {}) == ("run", "")


def test_enforce_raises_the_matching_pytest_outcome() -> None:
    with pytest.raises(pytest.fail.Exception, match="no Chromium"):
        gate.enforce("no Chromium at /x", {"CI": "true"})
    with pytest.raises(pytest.skip.Exception, match="no Chromium"):
        gate.enforce("no Chromium at /x", {})
    gate.enforce(None, {"CI": "true"})  # nothing missing: the test runs


def _stub_chromium(tmp_path: Path) -> Path:
    """An executable that is not a browser: it exits at once, as a broken Chromium install would."""
    stub = tmp_path / "bin" / "chromium"
    stub.parent.mkdir()
    stub.write_text("#!/bin/sh\necho 'stub chromium: cannot start' >&2\nexit 1\n")
    stub.chmod(0o755)
    return stub


@pytest.mark.parametrize("case", ["missing", "will-not-start"])
def test_browser_tests_fail_in_ci(case: str, tmp_path: Path) -> None:
    """tests/test_web_browser.py itself under CI=true, in a pytest of its own: with no Chromium both tests error
    before the server is built; with a Chromium that will not start they error when it is launched. Never a skip."""
    chromium = str(tmp_path / "no-such-chromium") if case == "missing" else str(_stub_chromium(tmp_path))
    env = {**os.environ, "CI": "true", "LMSCOPE_CHROMIUM": chromium, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rA",
         "tests/test_web_browser.py"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    out = r.stdout + r.stderr
    assert r.returncode == 1, out
    assert "2 errors" in out and "skipped" not in out and "passed" not in out, out
    assert "browser tests cannot run" in out and "CI=true" in out and "LMSCOPE_CHROMIUM" in out, out
    if case == "missing":
        assert f"no Chromium at {chromium}" in out and "make browser" in out, out
    else:
        assert f"Chromium at {chromium} would not start" in out, out


def _make_browser(env: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """`make browser` with PATH holding only an empty folder: no chromium, no apt-get, so nothing is installed."""
    make = shutil.which("make")
    if make is None:
        pytest.skip("make is not installed")
    empty = tmp_path / "empty-path"
    empty.mkdir(exist_ok=True)
    return subprocess.run([make, "-s", "-C", str(ROOT), "browser"], env={"PATH": str(empty), **env},
                          capture_output=True, text=True, timeout=60)  # fmt: skip


def test_make_browser_fails_loudly_in_ci_without_chromium(tmp_path: Path) -> None:
    r = _make_browser({"CI": "true"}, tmp_path)
    assert r.returncode != 0 and "no Chromium" in r.stderr and "CI=true" in r.stderr, (r.stdout, r.stderr)
    r = _make_browser({"CI": "true", "LMSCOPE_CHROMIUM": str(tmp_path / "nothing")}, tmp_path)
    assert r.returncode != 0 and "is not an executable file" in r.stderr, (r.stdout, r.stderr)
    r = _make_browser({}, tmp_path)  # outside CI: it says so and goes on
    assert r.returncode == 0 and "the browser tests will be skipped" in r.stdout, (r.stdout, r.stderr)
    stub = _stub_chromium(tmp_path)
    r = _make_browser({"CI": "true", "LMSCOPE_CHROMIUM": str(stub)}, tmp_path)
    assert r.returncode == 0 and f"browser: {stub}" in r.stdout, (r.stdout, r.stderr)
    r = _make_browser({"CI": "true", "PATH": f"{stub.parent}"}, tmp_path)  # `chromium` on PATH
    assert r.returncode == 0 and f"browser: {stub}" in r.stdout, (r.stdout, r.stderr)


def _browser_skips(path: Path) -> list[str]:
    """The pytest.skip / importorskip / skipif calls in a test file that are about Chromium or Playwright."""
    text = path.read_text()
    found = []
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute | ast.Name):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id
            call = ast.get_source_segment(text, node) or ""
            if name in {"skip", "importorskip", "skipif"} and re.search("chromium|playwright", call, re.I):
                found.append(f"{path.name}:{node.lineno}")
    return found


def test_no_browser_test_skips_around_the_gate() -> None:
    """A test file that skipped by itself for a missing Chromium or Playwright would skip in CI too: every browser
    test decides through browser_gate (as tests/test_web_browser.py does), so in CI it fails instead."""
    here = Path(__file__).parent
    offenders = [hit for path in sorted(here.glob("test_*.py")) for hit in _browser_skips(path)]
    assert offenders == [], (
        f"these skip for a missing Chromium/Playwright on their own, so they would skip in CI too: {offenders}; "
        "use browser_gate (browser_gate.problem / decide / enforce, see tests/test_web_browser.py) instead"
    )
