"""ONNX export of both versions and the onnxruntime cross-check, for a small model of every rule, both exporters."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxsurgery
from fxsurgery.artifacts.onnx_export import op_histogram


class Flat(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 4 * 4, 6)

    def forward(self, x):
        return self.fc(torch.flatten(self.conv(x), 1))


class Chain(nn.Module):
    def __init__(self):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc1 = nn.Linear(3 * 4, 8)
        self.fc2 = nn.Linear(8, 5)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(self.pool(x).flatten(1))))


class Pooled(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 4)

    def forward(self, x):
        return self.fc(x.mean([2, 3]))


class ChannelsLast(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 5)

    def forward(self, x):
        return self.fc(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


CASES = {
    # name: (model factory, input shape, direction, rewritten sites)
    "flatten->linear": (Flat, (2, 3, 4, 4), "conv", 1),
    "chain-linear": (Chain, (2, 3, 4, 4), "conv", 2),
    "pool->linear": (Pooled, (2, 3, 5, 5), "conv", 1),
    "channels-last-linear": (ChannelsLast, (2, 3, 4, 4), "conv", 1),
    "conv1x1": (lambda: nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 4, 1)), (2, 3, 5, 5), "linear", 2),
    "conv1x1-strided": (lambda: nn.Sequential(nn.Conv2d(3, 6, 1, stride=2)), (2, 3, 7, 7), "linear", 1),
    "conv-full-extent": (lambda: nn.Sequential(nn.Conv2d(3, 6, (4, 3))), (2, 3, 4, 3), "linear", 1),
    "conv1d-k1": (lambda: nn.Sequential(nn.Conv1d(3, 6, 1)), (2, 3, 9), "linear", 1),
    "convtranspose1x1": (lambda: nn.Sequential(nn.ConvTranspose2d(3, 6, 1)), (2, 3, 4, 4), "linear", 1),
}


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_cross_check_every_rule(case, exporter, tmp_path):
    make, shape, to, n_sites = CASES[case]
    torch.manual_seed(0)
    model = make().eval()
    x = torch.randn(shape)
    report = fxsurgery.check(model, x, to, tmp_path, exporter=exporter)
    assert report.passed, report.summary()
    assert len(report.surgery.rewritten) == n_sites
    chk = report.onnx
    assert chk.rewrite_visible is True and chk.dynamic_batch
    orig, rew = chk.op_counts["original"], chk.op_counts["rewritten"]
    conv_delta = sum(rew.get(op, 0) - orig.get(op, 0) for op in ("Conv", "ConvTranspose"))
    assert conv_delta == (n_sites if to == "conv" else -n_sites)
    assert {c.batch for c in chk.comparisons} == {2, 3}
    assert len(chk.comparisons) == 2 * 7  # torch rewritten + 4 ORT sessions vs torch; 2 ORT-vs-ORT pairs; 2 batches

    # An independent session in the test: the written rewritten file at a batch size the tool never used.
    sess = ort.InferenceSession(chk.rewritten_path, providers=["CPUExecutionProvider"])
    x7 = torch.randn(7, *shape[1:])
    got = sess.run(None, {sess.get_inputs()[0].name: x7.numpy()})[0]
    with torch.no_grad():
        expected = model(x7).numpy()
    scale = max(np.abs(expected).max(), 1e-3)
    assert np.abs(got - expected).max() / scale < 1e-4
    assert op_histogram(chk.rewritten_path) == rew
    # a drop-in replacement: the rewritten file's inputs and outputs have the original file's names
    original = ort.InferenceSession(chk.original_path, providers=["CPUExecutionProvider"])
    assert [o.name for o in sess.get_outputs()] == [o.name for o in original.get_outputs()]
    assert [i.name for i in sess.get_inputs()] == [i.name for i in original.get_inputs()]


def test_to_dict_and_summary(tmp_path):
    report = fxsurgery.check(Flat().eval(), torch.randn(2, 3, 4, 4), "conv", tmp_path)
    d = report.to_dict()
    assert d["passed"] is True and d["onnx"]["op_counts"]["rewritten"]["Conv"] == 2
    assert {"reference", "candidate", "batch", "max_abs_error", "max_rel_error", "passed"} <= set(d["onnx"]["comparisons"][0])
    assert "ONNX cross-check PASSED" in report.summary()


def test_cross_check_catches_a_wrong_rewritten_model(tmp_path):
    """A rewritten model that is not equivalent fails the cross-check, four ways."""
    model = Flat().eval()
    wrong = Flat().eval()  # different random weights
    chk = fxsurgery.cross_check(model, wrong, torch.randn(2, 3, 4, 4), tmp_path)
    assert not chk.passed and any("torch rewritten vs torch original" in f for f in chk.failures)


def test_dtype_limits_are_reported_not_crashed_on(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 1)).to(torch.float64).eval()
    report = fxsurgery.check(model, torch.randn(2, 3, 4, 4, dtype=torch.float64), "linear", tmp_path)
    chk = report.onnx
    assert chk.passed and any("dtype limit: float64" in s for s in chk.skipped), chk.summary()


def test_unknown_exporter(tmp_path):
    with pytest.raises(fxsurgery.InputError, match="unknown exporter"):
        fxsurgery.cross_check(Flat(), Flat(), torch.randn(1, 3, 4, 4), tmp_path, exporter="tflite")


def test_batch_one_example_still_exports_a_dynamic_batch(tmp_path):
    """torch.export specialises a size-1 dim; the cross-check traces with batch 2 and compares at 1 and 2."""
    report = fxsurgery.check(Flat().eval(), torch.randn(1, 3, 4, 4), "conv", tmp_path)
    assert report.passed, report.summary()
    assert report.onnx.dynamic_batch and {c.batch for c in report.onnx.comparisons} == {1, 2}


def test_the_run_time_guards_add_no_onnx_op(tmp_path):
    """The mode guard (a forward that branches on self.training) and the size guard are Python-level checks: the
    exported graph is the same with and without them."""
    import copy

    from fxsurgery import _runtime
    from fxsurgery.artifacts.onnx_export import export_onnx

    class Branch(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(64, 5)

        def forward(self, x):
            y = self.conv(x)
            if self.training:
                y = y * 0.5
            return self.fc(y.flatten(1))

    guarded = fxsurgery.linear_to_conv(Branch().eval(), torch.randn(2, 3, 6, 6)).module
    bare = copy.deepcopy(guarded)
    guards = (_runtime.check_mode, _runtime.check_spatial_size)
    assert sum(n.target in guards for n in guarded.graph.nodes) == 2
    for node in reversed(list(bare.graph.nodes)):
        if node.target in guards:
            if node.target is _runtime.check_spatial_size:
                node.replace_all_uses_with(node.args[0])  # it returns its input
            bare.graph.erase_node(node)
        elif node.op == "get_attr" and not node.users:
            bare.graph.erase_node(node)
    bare.recompile()
    for exporter in ("dynamo", "torchscript"):
        paths = [tmp_path / f"{name}-{exporter}.onnx" for name in ("guarded", "bare")]
        for module, path in zip((guarded, bare), paths):
            export_onnx(module, (torch.randn(2, 3, 6, 6),), path, exporter=exporter)
        assert op_histogram(paths[0]) == op_histogram(paths[1])


def test_the_empty_batch_path_adds_no_onnx_op(tmp_path):
    """The spatial layout's empty-batch branch (a batch of 0 stays on the batch axis) is resolved when exporting:
    the rewritten head exports to the same ops as the same head written by hand with the batch on the width axis."""
    from fxsurgery.artifacts.onnx_export import export_onnx

    model = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.Flatten(), nn.Linear(64, 7), nn.ReLU(),
                          nn.Linear(7, 5)).eval()  # fmt: skip

    class ByHand(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc1, self.fc2 = model[0], nn.Conv2d(4, 7, 4, stride=4), nn.Conv2d(7, 5, 1)

        def forward(self, x):
            y = self.conv(x).permute(1, 2, 0, 3).flatten(2).view(1, 4, 4, -1)  # the ops quantizers share qparams
            return self.fc2(torch.relu(self.fc1(y))).flatten(0, 2).t()

    rewritten = fxsurgery.linear_to_conv(model, torch.randn(2, 3, 8, 8)).module
    for exporter in ("dynamo", "torchscript"):
        paths = [tmp_path / f"{name}-{exporter}.onnx" for name in ("rewritten", "by-hand")]
        for module, path in zip((rewritten, ByHand().eval()), paths):
            export_onnx(module, (torch.randn(2, 3, 8, 8),), path, exporter=exporter)
        assert op_histogram(paths[0]) == op_histogram(paths[1]), exporter


def test_a_model_that_does_not_export_to_onnx_is_one_clear_error(tmp_path):
    class NoOnnx(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)

        def forward(self, x):
            y = self.conv(x)
            return y + torch.special.i1e(y)  # no ONNX counterpart

    for exporter in ("dynamo", "torchscript"):
        with pytest.raises(fxsurgery.SurgeryError, match="ONNX export of the original model failed .* or "
                                                         "check\\(..., onnx=False\\)"):  # fmt: skip
            fxsurgery.check(NoOnnx().eval(), torch.randn(2, 3, 4, 4), "linear", tmp_path / exporter,
                            exporter=exporter)  # fmt: skip
    report = fxsurgery.check(NoOnnx().eval(), torch.randn(2, 3, 4, 4), "linear", tmp_path / "none", onnx=False)
    assert report.passed and report.onnx is None and report.surgery.rewritten


def test_the_exporter_registry_is_built_once_and_exports_stay_the_same(tmp_path):
    """``torchlib_registry_once`` patches a private torch API (``ONNXRegistry.from_torchlib``): this pins it. Two
    exports build the registry once; the class is restored after each; the model exported under the cache runs in
    onnxruntime and matches torch (checked against the model, not against another export)."""
    from torch.onnx._internal.exporter import _registration

    from fxsurgery.artifacts import onnx_export

    builder = _registration.ONNXRegistry.__dict__["from_torchlib"]
    assert isinstance(builder, classmethod)  # the private API the cache wraps is still there
    onnx_export._REGISTRIES.clear()
    model, x = Chain().eval(), torch.randn(2, 3, 4, 4)
    for name in ("a.onnx", "b.onnx"):
        onnx_export.export_onnx(model, (x,), tmp_path / name)
        assert _registration.ONNXRegistry.__dict__["from_torchlib"] is builder
    assert len(onnx_export._REGISTRIES) == 1
    assert op_histogram(tmp_path / "a.onnx") == op_histogram(tmp_path / "b.onnx")
    out = ort.InferenceSession(str(tmp_path / "b.onnx")).run(None, {"input_0": x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(out, model(x).numpy(), rtol=1e-5, atol=1e-6)


def test_a_wrong_onnx_file_is_localized_to_its_first_diverging_value(tmp_path, monkeypatch):
    """The rewritten file's first Linear/conv weight is scaled after export (as an exporter bug would): onnxruntime
    then differs from torch, and the cross-check names the first intermediate value over the bound: the output of
    the node that reads the tampered weight (found in the file itself), not a value before it."""
    import importlib

    import onnx
    from onnx import numpy_helper

    from fxsurgery.models import demo_model

    cc = importlib.import_module("fxsurgery.verify.cross_check")  # the module (the package exports the function)
    stage = importlib.import_module("fxsurgery.verify.export_stage")
    export = stage.export_onnx
    tampered = {}

    def export_then_tamper(module, inputs, path, **kw):
        export(module, inputs, path, **kw)
        if path.name != "rewritten.onnx":
            return
        model = onnx.load(str(path))
        init = next(i for i in model.graph.initializer if i.name.startswith("classifier.1"))
        init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 1.5, init.name))
        reader = next(n for n in model.graph.node if init.name in n.input)
        tampered["value"] = reader.output[0]
        onnx.save(model, str(path))

    monkeypatch.setattr(stage, "export_onnx", export_then_tamper)
    model = demo_model().eval()
    res = fxsurgery.linear_to_conv(model, torch.randn(2, 3, 32, 32))
    check = cc.cross_check(model, res.module, (torch.randn(2, 3, 32, 32),), tmp_path)
    assert not check.passed
    where = [f for f in check.failures if f.startswith("rewritten.onnx: the first value over the bound is")]
    assert len(where) == 1 and f"is {tampered['value']!r} (max abs error" in where[0], check.failures
    assert not any(f.startswith("original.onnx:") for f in check.failures)
