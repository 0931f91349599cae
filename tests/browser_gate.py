"""Whether the browser tests (tests/test_web_browser.py) can run, and what to do when they cannot.

Outside CI a missing Playwright or Chromium skips them, saying why. In CI (the environment variable CI set to
true, as CI services do) it fails them instead, saying what is missing and how to install it: a CI run that quietly
skipped the only tests of the explorer in a real browser would look green without having checked it.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from typing import Literal

import pytest

INSTALL_PLAYWRIGHT = "install it with `.venv/bin/pip install -e '.[dev]'` (Playwright's Python package)"
INSTALL_CHROMIUM = (
    "install it with `make browser` (apt-get install chromium, as root or with passwordless sudo) or point "
    "LMSCOPE_CHROMIUM at a Chromium executable"
)


def in_ci(env: Mapping[str, str]) -> bool:
    """CI=true (also 1 or yes, in any case), as GitHub Actions, GitLab CI and most others set it."""
    return env.get("CI", "").strip().lower() in {"1", "true", "yes"}


def chromium_path(env: Mapping[str, str]) -> str:
    """$LMSCOPE_CHROMIUM, else `chromium` on PATH, else /usr/bin/chromium (Debian's package)."""
    return env.get("LMSCOPE_CHROMIUM") or shutil.which("chromium", path=env.get("PATH")) or "/usr/bin/chromium"


def problem(playwright_error: str | None, chromium: str) -> str | None:
    """What keeps the browser tests from running (None: nothing): Playwright not importable (`playwright_error`,
    the ImportError's text) or no executable Chromium at `chromium`."""
    if playwright_error is not None:
        return f"Playwright is not importable ({playwright_error}): {INSTALL_PLAYWRIGHT}"
    if not os.path.isfile(chromium):
        return f"no Chromium at {chromium}: {INSTALL_CHROMIUM}"
    if not os.access(chromium, os.X_OK):
        return f"{chromium} is not executable: {INSTALL_CHROMIUM}"
    return None


def launch_problem(chromium: str, exc: BaseException) -> str:
    """A Chromium that is there but would not start (a broken install, missing shared libraries)."""
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return f"Chromium at {chromium} would not start ({first}): {INSTALL_CHROMIUM}"


def decide(why: str | None, env: Mapping[str, str]) -> tuple[Literal["run", "skip", "fail"], str]:
    """("run", "") when nothing is missing; else ("fail", message) in CI and ("skip", message) elsewhere."""
    if why is None:
        return "run", ""
    if in_ci(env):
        return "fail", f"browser tests cannot run: {why} (CI=true: they must run in CI, so this is a failure)"
    return "skip", f"browser tests skipped: {why} (in CI, with CI=true, this fails instead)"


def enforce(why: str | None, env: Mapping[str, str] | None = None) -> None:
    """Skip or fail the current test as `decide` says (in a fixture: every test using it); nothing when `why` is
    None. (At import, a module skips itself with pytest.skip(..., allow_module_level=True) but must not fail: a
    failure while collecting stops the whole pytest run.)"""
    action, message = decide(why, os.environ if env is None else env)
    if action == "fail":
        pytest.fail(message, pytrace=False)
    if action == "skip":
        pytest.skip(message)
