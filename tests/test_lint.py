"""The tree stays ruff-clean and ruff-formatted: part of the test command, so CI and developers run
the same checks."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def ruff(*args: str) -> subprocess.CompletedProcess:
    executable = shutil.which("ruff")
    if executable is None:
        if os.environ.get("CI"):
            pytest.fail("ruff is part of the test extra and must be installed in CI")
        pytest.skip("ruff is not installed (pip install -e '.[test]')")
    return subprocess.run([executable, *args, str(ROOT)], capture_output=True, text=True)


def test_ruff_clean():
    result = ruff("check")
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_formatted():
    result = ruff("format", "--check")
    assert result.returncode == 0, "run `ruff format`:\n" + result.stdout + result.stderr
