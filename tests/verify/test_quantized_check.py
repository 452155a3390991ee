"""Rewrite, then quantize: the forms the rewrite emits keep their scales under PT2E (XNNPACKQuantizer) and
onnxruntime's static QDQ, and ``check(..., quantize=...)`` quantizes both versions with one recipe and says how they
compare. Expected values come from the quantized original (torchao's PT2E run here, onnxruntime's own quantizer),
never from the tool's output."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

import pytest
import torch
from torch import nn

import fxsurgery
from fxsurgery.cli import main
from fxsurgery.engine.emit import op_name
from fxsurgery.models import demo_model
from fxsurgery.verify.quantized import layout_census

pytest.importorskip("torchao", reason="quantization is optional: pip install fxsurgery[quant]")
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e  # noqa: E402
from torchao.testing.pt2e._xnnpack_quantizer import (  # noqa: E402
    XNNPACKQuantizer,
    get_symmetric_quantization_config,
)


def quantized(model: nn.Module, x: tuple) -> torch.export.ExportedProgram:
    """``model`` quantized by torchao's PT2E (XNNPACKQuantizer, per channel), calibrated on ``x``."""
    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    prepared = prepare_pt2e(torch.export.export(model.eval(), x, strict=False).module(), quantizer)
    prepared(*x)
    return torch.export.export(convert_pt2e(prepared), x, strict=False)


def _step(program: torch.export.ExportedProgram) -> float:
    out = next(n for n in program.graph.nodes if n.op == "output").args[0][0]
    return float(out.args[1])  # the scale of the dequantize that makes the output


def _agreement(model: nn.Module, rewritten: nn.Module, x: tuple, probe: tuple) -> tuple[float, float, float]:
    """The share of the quantized rewrite's outputs within one step of the quantized original's, and the error of
    each against the float model, on ``probe`` (not the calibration data)."""
    a_q, b_q = quantized(model, x), quantized(rewritten, x)
    ref, a, b = model(*probe), a_q.module()(*probe), b_q.module()(*probe)
    ref, a, b = (getattr(t, "logits", t) for t in (ref, a, b))
    err = lambda q: float((q - ref).norm() / ref.norm())  # noqa: E731
    return float(((a - b).abs() <= _step(a_q) * 1.001).float().mean()), err(a), err(b)


class PooledHead(nn.Module):
    """A map pooled, then flattened (``view``: shared by XNNPACKQuantizer) or reshaped (not shared: requantized)."""

    def __init__(self, reshape: bool) -> None:
        super().__init__()
        self.conv, self.fc, self.reshape = nn.Conv2d(3, 8, 3), nn.Linear(8 * 4 * 4, 5), reshape

    def forward(self, x):
        y = nn.functional.adaptive_avg_pool2d(self.conv(x).relu(), 4)
        return self.fc(y.reshape(y.shape[0], -1) if self.reshape else y.flatten(1))


def test_the_census_counts_a_requantization_the_quantizer_adds():
    """An independent case: XNNPACKQuantizer shares qparams through flatten and not through reshape, so the same
    model written with reshape rounds its activations once more."""
    x = (torch.randn(2, 3, 10, 10),)
    shared, own = (layout_census(quantized(PooledHead(r), x).graph) for r in (False, True))
    assert own["requantizations"] == shared["requantizations"] + 1
    assert own["broken islands"] == shared["broken islands"] == 0


@pytest.mark.parametrize("batch_layout", ["spatial", "batch"])
def test_rewrite_then_quantize_keeps_the_quantized_outputs_with_either_batch_layout(batch_layout):
    """The spatial layout moves the batch with permute/flatten/view only (XNNPACKQuantizer requantizes after t or
    reshape): no quantize of its own, outputs within one step of the quantized original's."""
    g = torch.Generator().manual_seed(0)
    x, probe = (torch.randn(2, 3, 32, 32, generator=g),), (torch.randn(2, 3, 32, 32, generator=g),)
    model = demo_model().eval()
    rewritten = fxsurgery.linear_to_conv(model, x, batch_layout=batch_layout).module
    a, b = (layout_census(quantized(m, x).graph) for m in (model, rewritten))
    assert b["requantizations"] == a["requantizations"] and b["broken islands"] == 0
    within, err_a, err_b = _agreement(model, rewritten, x, probe)
    assert within >= 0.99 and err_b <= err_a * 1.05


def _bert():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, num_labels=3
    )
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config).eval()
    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(1))
    return model, (ids,)


def test_token_layout_for_quantization_keeps_layer_norm_and_attention_whole():
    """quantize=: each LayerNorm one layer_norm, each attention SDPA itself; the 9-op LayerNorm of the plain token
    layout is quantized piecewise by XNNPACKQuantizer (its adds and multiplies), which costs accuracy."""
    model, x = _bert()
    plain = fxsurgery.linear_to_conv(model, x, token_layout=True)
    friendly = fxsurgery.linear_to_conv(model, x, token_layout=True, quantize="int8")
    assert len(friendly.rewritten) == len(plain.rewritten) >= 12 and friendly.validation
    ops = [op_name(n.target) for n in torch.export.export(friendly.module, x, strict=False).graph.nodes]
    norms = sum(isinstance(m, nn.LayerNorm) for m in model.modules())
    assert ops.count("aten::layer_norm") == norms and "aten::einsum" not in ops
    assert ops.count("aten::scaled_dot_product_attention") == model.config.num_hidden_layers
    probe = (torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(2)),)
    within, err_a, err_b = _agreement(model, friendly.module, x, probe)
    assert within >= 0.99 and err_b <= err_a * 1.05


def test_check_quantize_compares_both_versions_quantized(tmp_path, monkeypatch):
    """PT2E and onnxruntime's static QDQ (quant_pre_process with symbolic shape inference, then quantize_static)
    on both versions; the errors against the float model are measured here too, from onnxruntime's own tools."""
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    model, x = _bert()
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    report = fxsurgery.check(model, x, out_dir=tmp_path, token_layout=True, quantize="int8")
    assert not list(Path.cwd().iterdir())  # nothing written where the caller runs
    assert not [p for p in tmp_path.iterdir() if p.suffix == ".data" or p.name.startswith("sym_shape")]
    q = report.quantized
    assert report.passed and q is not None and q.passed, report.summary()
    assert q.census["rewritten"]["requantizations"] == q.census["original"]["requantizations"]
    assert set(q.onnx_error) == {"original", "rewritten"} and q.within_one_step is not None
    assert "quantized cross-check" in report.summary() and report.to_dict()["quantized"]["passed"]

    class Reader(CalibrationDataReader):
        def __init__(self, name):
            self.batches = iter([{name: x[0].numpy()}])

        def get_next(self):
            return next(self.batches, None)

    probe = torch.randint(0, 100, (4, 8), generator=torch.Generator().manual_seed(3))
    ref = model(probe).logits.detach().numpy()
    # (quant_pre_process below leaves sym_shape_infer_temp.onnx and <uuid>.data in the working directory: tmp's)
    errors, inferred = [], {}
    for name in ("original", "rewritten"):
        pre, out = tmp_path / f"{name}.pre2.onnx", tmp_path / f"{name}.q2.onnx"
        try:  # its symbolic shape inference raised on the rewrite's attention before (ReduceMin)
            quant_pre_process(str(tmp_path / f"{name}.onnx"), str(pre))
            inferred[name] = True
        except Exception:  # it gives up on transformers' Min(512, sequence) of a dynamic sequence axis
            quant_pre_process(str(tmp_path / f"{name}.onnx"), str(pre), skip_symbolic_shape=True)
            inferred[name] = False
        name_in = ort.InferenceSession(str(pre), providers=["CPUExecutionProvider"]).get_inputs()[0].name
        quantize_static(str(pre), str(out), Reader(name_in), per_channel=True, weight_type=QuantType.QInt8)
        sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        got = sess.run(None, {sess.get_inputs()[0].name: probe.numpy()})[0]
        errors.append(float(np.linalg.norm(got - ref) / np.linalg.norm(ref)))
    assert errors[1] <= errors[0] * 1.05
    assert inferred["rewritten"] or not inferred["original"]  # wherever it infers the original's shapes


def test_check_quantize_refuses_a_model_already_quantized():
    x = torch.randn(2, 3, 32, 32)
    program = quantized(demo_model(), (x,))
    with pytest.raises(fxsurgery.InputError, match="already quantized"):
        fxsurgery.check(program, None, quantize="int8", onnx=False)


def test_check_quantize_takes_the_users_quantizer():
    """A PT2E quantizer object (here per-tensor weights) is the recipe for both versions."""
    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=False))
    x, model = torch.randn(2, 3, 32, 32), demo_model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    report = fxsurgery.check(model, x, onnx=False, quantize=quantizer)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # quantized copies, not the model
    q = report.quantized
    assert q is not None and q.recipe == "XNNPACKQuantizer" and q.passed, report.summary()
    assert not q.onnx_error  # no ONNX files to quantize


def test_quantize_takes_int8_or_a_quantizer():
    with pytest.raises(fxsurgery.InputError, match="quantize must be None, 'int8' or a PT2E quantizer"):
        fxsurgery.Options(quantize="int4")
    assert fxsurgery.Options(quantize=XNNPACKQuantizer()).quantize is not None


def test_the_cli_quantize_flag_writes_the_comparison(tmp_path):
    import logging

    onnx_logger = logging.getLogger("torch.onnx")  # the command line quiets it for its process, not for the tests'
    level, out = onnx_logger.level, tmp_path / "out"
    try:
        code = main(
            ["rewrite", "fxsurgery.models:demo_model", "--input-shape", "2,3,32,32", "--to", "conv", "--quantize",
             "int8", "--out", str(out)]  # fmt: skip
        )
    finally:
        onnx_logger.setLevel(level)
    data = json.loads((out / "report.json").read_text())
    assert code == 0 and data["quantized"]["passed"] and (out / "rewritten.int8.onnx").exists()
    assert "Quantized cross-check" in (out / "report.html").read_text()
