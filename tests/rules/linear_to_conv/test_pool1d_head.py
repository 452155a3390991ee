"""pool1d->linear: a Linear on the mean over L of a Conv1d stack's (N, C, L) output is a mean with keepdim and a 1x1
conv (NumPy float64 reference); to="auto" and the command line take the rule up with no change of their own."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import fxsurgery
from tests import reference
from tests.conftest import run_surgery


class Conv1dClassifier(nn.Module):
    """An audio/sensor-style classifier: a Conv1d stack, the mean over time, a Linear."""

    def __init__(self, mean=lambda x: x.mean(-1)):
        super().__init__()
        self.features = nn.Sequential(nn.Conv1d(3, 8, 5, padding=2), nn.ReLU(), nn.Conv1d(8, 6, 3, padding=1))
        self.mean = mean
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        return self.fc(self.mean(self.features(x)))


def build() -> nn.Module:
    return Conv1dClassifier().eval()


@pytest.mark.parametrize(
    "mean", [lambda x: x.mean(-1), lambda x: x.mean(2), lambda x: torch.mean(x, [2])], ids=["-1", "2", "torch"]
)
@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_the_head_becomes_a_1x1_conv_equal_to_the_numpy_linear(mean, frontend):
    model = Conv1dClassifier(mean).eval().double()
    x = torch.randn(3, 3, 20, dtype=torch.float64)
    res = run_surgery("linear_to_conv", model, x, rewritten=["fc"], frontend=frontend)
    assert [s.pattern for s in res.sites] == ["pool1d->linear"]
    assert isinstance(res.module.get_submodule("fc"), nn.Conv2d)
    with torch.no_grad():
        pooled = model.features(x).numpy().mean(axis=2)
        expected = reference.linear(pooled, model.fc.weight.numpy(), model.fc.bias.numpy())
        np.testing.assert_allclose(res.module(x).numpy(), expected, rtol=0, atol=1e-12)


def test_a_mean_over_channels_is_not_a_pooled_sequence():
    model = Conv1dClassifier(lambda x: x.mean(1)[:, :6]).eval()
    res = run_surgery("linear_to_conv", model, torch.randn(2, 3, 6), rewritten=[], skipped={"fc": "not a flattened"})
    assert res.sites[0].pattern == "flatten->linear"


def test_auto_and_the_command_line_take_the_new_rule_up(tmp_path):
    model, x = build(), torch.randn(2, 3, 20)
    res = fxsurgery.rewrite(model, x, "auto", runtime="torch")
    assert any(s.name == "fc" and s.pattern == "pool1d->linear" for s in res.sites), res.summary()
    root = Path(__file__).resolve().parents[3]
    proc = subprocess.run(
        [sys.executable, "-m", "fxsurgery", "list", f"{__file__}:build", "--to", "conv", "--input-shape", "2,3,20",
         "--json", "--quiet"],
        capture_output=True, text=True, cwd=root, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert '"pool1d->linear"' in proc.stdout
