"""The package and the benchmarks pass ruff (lint) and mypy (types), as configured in pyproject.toml."""

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_ruff_is_clean():
    if shutil.which("ruff") is None:
        pytest.skip("ruff is not installed (it is in the test extra)")
    r = run("ruff", "check", "grumpy", "benchmarks")
    assert r.returncode == 0, r.stdout + r.stderr


def test_mypy_is_clean():
    pytest.importorskip("mypy")
    r = run(sys.executable, "-m", "mypy")  # files and options from pyproject.toml
    assert r.returncode == 0, r.stdout + r.stderr
