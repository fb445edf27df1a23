"""The tree passes ruff's lint and format check and mypy, as pyproject.toml configures them ([tool.ruff], [tool.mypy]).

conftest.py runs these first, so CI (.ci/run runs README's test command) checks lint and types before
the other tests. Both tools come with the `test` extra; without them the tests skip and say how to get them.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(tool: str, *args: str) -> subprocess.CompletedProcess[str]:
    if importlib.util.find_spec(tool) is None:
        pytest.skip(f"{tool} is not installed: pip install -c constraints.txt -e '.[test]'")
    return subprocess.run([sys.executable, "-m", tool, *args], cwd=ROOT, capture_output=True, text=True)


def test_ruff_check_is_clean():
    """ruff's rules (E, F, W, I, B, RUF100) over the whole repository; RUF100 also fails a `noqa` that
    suppresses nothing. Fix with `ruff check --fix` (and review the diff)."""
    result = _run("ruff", "check", "--no-cache", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_format_is_clean():
    """The tree is formatted as `ruff format` writes it ([tool.ruff.format]); fix with `ruff format .`."""
    result = _run("ruff", "format", "--check", "--no-cache", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_is_clean():
    """mypy over the ckptplan package (`mypy` from the repository root)."""
    result = _run("mypy")
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_module_is_over_500_lines():
    """One job per module, a few hundred lines each: none of ckptplan's modules is over 500 lines."""
    long = {
        str(p.relative_to(ROOT / "ckptplan")): n
        for p in sorted((ROOT / "ckptplan").rglob("*.py"))
        if (n := len(p.read_text(encoding="utf-8").splitlines())) > 500
    }
    assert not long, long
