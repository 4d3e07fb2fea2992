"""ruff's lint and format checks, and mypy's type check, are part of the suite."""

import subprocess
import sys

from .conftest import ROOT


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True)


def test_ruff_lint_and_format_are_clean():
    lint = run("ruff", "check", ".")
    assert lint.returncode == 0, lint.stdout
    fmt = run("ruff", "format", "--check", ".")
    assert fmt.returncode == 0, fmt.stdout


def test_mypy_finds_nothing_in_the_package():
    # The files and strictness are configured in pyproject.toml ([tool.mypy]).
    checked = run("mypy")
    assert checked.returncode == 0, checked.stdout[-5000:]
