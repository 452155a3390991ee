"""Results that pass but say little are said to: outputs below the comparison floor (validation compared nothing
real), no site rewritten (one line, and an opt-in exit code), a dry run (what *would* happen)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import fxsurgery
from fxsurgery.models import demo_model
from fxsurgery.verify.policy import RTOL, SCALE_FLOOR

ROOT = Path(__file__).resolve().parents[1]


class ScaledHead(nn.Module):
    """A pooled head whose outputs are ``scale`` times those of a plain one (a model at a default initialisation that
    leaves its outputs tiny, as torchvision's mobilenet_v3_small's are: ~1e-9)."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 8, 3), nn.Linear(8, 4)
        with torch.no_grad():
            self.fc.weight.mul_(scale)
            self.fc.bias.zero_()

    def forward(self, x):
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(self.conv(x), 1), 1))


def _rewritten(scale: float):
    torch.manual_seed(0)
    model, x = ScaledHead(scale).eval(), torch.randn(2, 3, 8, 8)
    return model, x, fxsurgery.linear_to_conv(model, x)


def test_outputs_far_below_the_floor_are_said_to_test_nothing():
    model, x, res = _rewritten(1e-9)
    with torch.no_grad():
        scale = float(model(x).abs().max())
    assert res.validation.passed and "this validation tested nothing" in res.validation.warning
    said = float(re.search(r"at most (\S+) in magnitude", res.validation.warning).group(1))  # over every input
    assert scale <= said * 1.001 and said < RTOL[torch.float32] * SCALE_FLOOR  # zeros would be within tolerance
    assert "WARNING: the original's outputs are at most" in res.summary()
    assert res.validation.to_dict()["warning"] == res.validation.warning


def test_outputs_somewhat_below_the_floor_say_how_much_looser_the_tolerance_is():
    _, _, res = _rewritten(1e-3)
    said = float(re.search(r"at most (\S+) in magnitude", res.validation.warning).group(1))
    assert RTOL[torch.float32] * SCALE_FLOOR < said < SCALE_FLOOR
    assert f"{SCALE_FLOOR / said:.3g}x looser than stated" in res.validation.warning


def test_outputs_of_real_size_carry_no_warning():
    _, _, res = _rewritten(1.0)
    assert res.validation.passed and res.validation.warning == "" and "WARNING" not in res.summary()


def _cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fxsurgery", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=600)  # fmt: skip


def test_a_run_that_rewrites_nothing_says_so_and_can_fail(tmp_path):
    args = ["rewrite", "torch.nn.ReLU", "--input-shape", "1,3,8,8", "--to", "conv", "--artifacts", "none", "--quiet"]
    plain = _cli(*args, "--out", str(tmp_path / "a"))
    assert plain.returncode == 0, plain.stderr
    line = "fxsurgery: warning: nothing was rewritten (no candidate found): the model is unchanged"
    assert line in plain.stderr.splitlines()
    assert "WARNING: nothing was rewritten" in plain.stdout
    strict = _cli(*args, "--out", str(tmp_path / "b"), "--fail-if-unchanged")
    assert strict.returncode == 3 and line in strict.stderr.splitlines()
    assert (tmp_path / "b" / "report.json").is_file()  # the report is kept: it says why


def test_fail_if_unchanged_does_not_fail_a_run_that_rewrites(tmp_path):
    proc = _cli("rewrite", "fxsurgery.models:demo_model", "--input-shape", "1,3,32,32", "--to", "conv", "--artifacts",
                "none", "--quiet", "--out", str(tmp_path / "o"), "--fail-if-unchanged")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "nothing was rewritten" not in proc.stderr + proc.stdout


def test_a_dry_run_says_what_would_be_rewritten():
    model, x = demo_model(), torch.randn(1, 3, 32, 32)
    expected = len(fxsurgery.linear_to_conv(model, x).rewritten)
    proc = _cli("list", "fxsurgery.models:demo_model", "--input-shape", "1,3,32,32", "--to", "conv", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert f"would rewrite {expected}, would skip 0" in proc.stdout and "dry run" in proc.stdout
    assert proc.stdout.count("would rewrite") == expected + 1 and " rewritten " not in proc.stdout
    data = json.loads(_cli("rewrite", "fxsurgery.models:demo_model", "--input-shape", "1,3,32,32", "--to", "conv",
                           "--dry-run", "--json", "--quiet").stdout)  # fmt: skip
    assert data["dry_run"] is True and len(data["sites"]) == expected


@pytest.mark.parametrize("strict", [False, True])
def test_a_dry_run_with_nothing_to_rewrite(strict):
    proc = _cli("list", "torch.nn.ReLU", "--input-shape", "1,3,8,8", "--to", "conv", "--quiet",
                *(["--fail-if-unchanged"] if strict else []))  # fmt: skip
    assert proc.returncode == (3 if strict else 0), proc.stderr
    assert "nothing would be rewritten (no candidate found): the model would stay unchanged" in proc.stdout
