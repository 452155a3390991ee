"""The optional runtimes of the cross-check (OpenVINO, ExecuTorch with XNNPACK): both models run there and agree
with torch, both directions; a wrong rewritten model fails there too. Each test skips without its toolchain."""

from __future__ import annotations

import copy
import importlib.util
import math

import pytest
import torch
from torch import nn

import fxsurgery
from fxsurgery.models import demo_model
from fxsurgery.runtimes import registry
from fxsurgery.verify import localize
from fxsurgery.verify.cross_check import cross_check

LABELS = {"openvino": "OpenVINO", "executorch": "ExecuTorch-XNNPACK"}


def _needs(runtime):
    package = registry.RUNTIMES[runtime].package
    return pytest.mark.skipif(importlib.util.find_spec(package) is None,
                              reason=f'{package} is optional: pip install "fxsurgery[{registry.RUNTIMES[runtime].extra}]"')


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
    monkeypatch.setattr(registry.importlib.util, "find_spec", lambda name, *a: None)
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


class _Skewed(torch.fx.Interpreter):
    """A fake runtime that computes the call of one module (``bad``) 1.5 times too large, and the rest right."""

    bad = ""

    def call_module(self, target, args, kwargs):
        out = super().call_module(target, args, kwargs)
        return out * 1.5 if target == self.bad else out


def _skewed_runtime(bad: str, log: list):
    def run(module, inputs):
        log.append(module)
        interpreter = _Skewed(module)
        interpreter.bad = bad
        out = interpreter.run(*inputs)
        return list(out) if isinstance(out, tuple) else [out]

    return run


@pytest.mark.parametrize(("to", "bad"), [("linear", "features.pointwise2"), ("conv", "aux"), ("conv", "classifier.4")])
def test_the_node_a_runtime_computes_wrong_is_found_by_bisection(to, bad):
    """The demo model has a side branch (aux) beside the main one: values after the wrong node in graph order are
    not all wrong, and the answer must still be the wrong node itself, not a later one."""
    model, x = demo_model().eval(), torch.randn(2, 3, 32, 32)
    res = fxsurgery.linear_to_conv(model, x) if to == "conv" else fxsurgery.conv_to_linear(model, x)
    wrong_node = next(n for n in res.module.graph.nodes if n.op == "call_module" and n.target == bad)
    log: list = []
    where = localize.first_failing_node(_skewed_runtime(bad, log), res.module, (x,))
    assert where.startswith(f"the first node it computes wrong is {wrong_node.name!r} ({bad}: "), where
    nodes = sum(n.op not in ("placeholder", "output") for n in res.module.graph.nodes)
    assert 2 <= len(log) <= math.ceil(math.log2(nodes)) + 1  # bisection, not one conversion per value
    assert localize.first_failing_node(_skewed_runtime("nothing", []), res.module, (x,)).startswith(
        "could not localize it: the graph's last values agree")


def test_a_node_the_runtime_cannot_run_is_named():
    model, x = demo_model().eval(), torch.randn(2, 3, 32, 32)
    res = fxsurgery.conv_to_linear(model, x)

    def refuses_linear(module, inputs):
        if any(isinstance(m, nn.Linear) for m in module.modules()):
            raise RuntimeError("no kernel for Linear")
        return list(module(*inputs))

    where = localize.first_failing_node(refuses_linear, res.module, (x,))
    first_linear = next(n for n in res.module.graph.nodes
                        if n.op == "call_module" and isinstance(res.module.get_submodule(n.target), nn.Linear))
    assert f"is {first_linear.name!r}" in where and "cannot run it: RuntimeError: no kernel for Linear" in where


@pytest.mark.parametrize("runtime", [pytest.param("openvino", marks=_needs("openvino")),
                                     pytest.param("executorch", marks=_needs("executorch"))])  # fmt: skip
def test_a_runtime_that_runs_one_layer_wrong_is_localized_to_it(runtime, tmp_path, monkeypatch):
    """The real runtime, given models whose ``down`` layer has its weight scaled (as a converter bug would): the
    cross-check fails and names the rewritten graph's ``down`` node, the cut graphs converting on the runtime."""
    model, x = demo_model().eval(), torch.randn(2, 3, 32, 32)
    res = fxsurgery.conv_to_linear(model, x)
    backend = type(registry.RUNTIMES[runtime].impl())
    real = backend.run

    def wrong_down(self, module, inputs):
        module = copy.deepcopy(module)
        for name, sub in module.named_modules():
            if name == "down":
                sub.weight.data *= 1.5
        return real(self, module, inputs)

    monkeypatch.setattr(backend, "run", wrong_down)
    check = cross_check(model, res.module, (x,), tmp_path, runtimes=(runtime,))
    down = next(n.name for n in res.module.graph.nodes if n.op == "call_module" and n.target == "down")
    where = [f for f in check.failures if f.startswith(f"{LABELS[runtime]} rewritten: the first node")]
    assert not check.passed and len(where) == 1, check.failures
    assert f"computes wrong is {down!r} (down: Linear 32->64" in where[0], where
