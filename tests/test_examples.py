"""The example scripts run as documented, and the TRL one shows equal losses with and without the drop-in."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run(script):
    env = {**os.environ, "TRL_EXPERIMENTAL_SILENCE": "1"}
    result = subprocess.run(
        [sys.executable, script], cwd=EXAMPLES, capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def training_losses(stdout):
    return dict(re.findall(r"^(\w+): training loss ([\d.]+)$", stdout, flags=re.M))


def test_gkd_trl_example():
    pytest.importorskip("trl")
    losses = training_losses(run("gkd_trl_fused.py"))
    assert set(losses) == {"GKDTrainer", "FusedGKDTrainer"}
    assert losses["GKDTrainer"] == losses["FusedGKDTrainer"]


def test_hf_trainer_example():
    stdout = run("hf_trainer_fused.py")
    assert "DistillationTrainer" in training_losses(stdout)
    fused, naive = map(float, re.search(r"fused loss ([\d.]+), naive loss ([\d.]+)", stdout).groups())
    assert abs(fused - naive) <= 1e-5 * naive and naive > 0.1  # the same loss, and not a trivial one
