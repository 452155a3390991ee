"""The optional runtimes of the cross-check (OpenVINO, ExecuTorch with XNNPACK): both models run there and agree
with torch, both directions; a wrong rewritten model fails there too. Each test skips without its toolchain."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch import nn

import fxsurgery
from fxsurgery.models import demo_model
from fxsurgery.verify import runners
from fxsurgery.verify.cross_check import cross_check

LABELS = {"openvino": "OpenVINO", "executorch": "ExecuTorch-XNNPACK"}


def _needs(runtime):
    package = runners.RUNNERS[runtime][0]
    return pytest.mark.skipif(importlib.util.find_spec(package) is None,
                              reason=f'{package} is optional: pip install "fxsurgery[{runners.RUNNERS[runtime][1]}]"')


@pytest.mark.parametrize("to", ["conv", "linear"])
@pytest.mark.parametrize("runtime", [pytest.param("openvino", marks=_needs("openvino")),
                                     pytest.param("executorch", marks=_needs("executorch"))])  # fmt: skip
def test_both_models_run_on_the_runtime_and_agree(runtime, to, tmp_path):
    report = fxsurgery.check(demo_model(), torch.randn(2, 3, 32, 32), to, tmp_path, runtimes=(runtime,))
    assert report.passed, report.onnx.failures
    label = LABELS[runtime]
    mine = {(c.reference, c.candidate) for c in report.onnx.comparisons if label in c.candidate}
    assert mine == {("torch original", f"{label} original"), ("torch original", f"{label} rewritten"),
                    (f"{label} original", f"{label} rewritten")}  # fmt: skip


class _Off(nn.Module):
    """The demo model with its output shifted: a wrong "rewritten" model."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x) + 1.0


@pytest.mark.parametrize("runtime", [pytest.param("openvino", marks=_needs("openvino")),
                                     pytest.param("executorch", marks=_needs("executorch"))])  # fmt: skip
def test_a_wrong_model_fails_on_the_runtime(runtime, tmp_path):
    model = demo_model().eval()
    check = cross_check(model, _Off(model), (torch.randn(2, 3, 32, 32),), tmp_path, runtimes=(runtime,))
    label = LABELS[runtime]
    assert not check.passed
    assert any(f"{label} rewritten vs {label} original" in f for f in check.failures), check.failures


def test_an_unknown_or_missing_runtime_is_one_clear_error(tmp_path, monkeypatch):
    model, x = demo_model(), (torch.randn(1, 3, 32, 32),)
    with pytest.raises(fxsurgery.InputError, match="unknown cross-check runtime 'tvm'"):
        cross_check(model, model, x, tmp_path, runtimes=("tvm",))
    monkeypatch.setattr(runners.importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(fxsurgery.InputError, match=r'needs openvino: pip install "fxsurgery\[openvino\]"'):
        cross_check(model, model, x, tmp_path, runtimes=("openvino",))


def test_the_cli_refuses_an_unknown_cross_check_runtime_in_one_line(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "fxsurgery", "rewrite", "fxsurgery.models:demo_model", "--to", "conv",
                           "--input-shape", "1,3,32,32", "--out", str(tmp_path / "o"), "--cross-check-runtimes",
                           "openvino,tvm"], capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "unknown runtime 'tvm'" in proc.stderr and proc.stderr.strip().count("\n") == 0
