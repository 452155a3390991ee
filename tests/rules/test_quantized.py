"""The quantized rules (``qlinear->conv``, ``qconv->linear``) on PT2E- and torchao-quantized graphs: every quantized
Linear/conv a site, the int8 islands whole, the outputs those of the quantized original (PT2E's reference), and the
refusals and reasons for what is not a converted graph."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxsurgery
from fxsurgery.engine.emit import op_name
from fxsurgery.models import demo_model
from fxsurgery.rules.aten.qdq import is_dequantize

pytest.importorskip("torchao", reason="quantization is optional: pip install fxsurgery[quant]")
from torchao.quantization.pt2e import move_exported_model_to_eval  # noqa: E402
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e, prepare_qat_pt2e  # noqa: E402
from torchao.testing.pt2e._xnnpack_quantizer import (  # noqa: E402
    XNNPACKQuantizer,
    get_symmetric_quantization_config,
)

LAYOUT_OPS = ("aten::view", "aten::view_copy", "aten::reshape", "aten::permute", "aten::permute_copy", "aten::t")


def _prepared(model: nn.Module, x: torch.Tensor, qat: bool = False) -> torch.fx.GraphModule:
    config = get_symmetric_quantization_config(is_per_channel=True, is_qat=qat)
    captured = torch.export.export(model.train(qat), (x,), strict=False).module()
    return (prepare_qat_pt2e if qat else prepare_pt2e)(captured, XNNPACKQuantizer().set_global(config))


def quantized(model: nn.Module, x: torch.Tensor) -> torch.export.ExportedProgram:
    """``model`` PT2E-quantized (XNNPACKQuantizer, per channel), calibrated on ``x``, exported."""
    torch.manual_seed(0)
    prepared = _prepared(model.eval(), x)
    prepared(x)
    return torch.export.export(convert_pt2e(prepared), (x,), strict=False)


class Tokens(nn.Module):
    """Linears on (N, S, C) tokens with a GELU between them, and a pointwise conv on a map."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(8, 16), nn.Linear(16, 8)
        self.point = nn.Conv2d(8, 12, 1)

    def forward(self, x):
        tokens = self.down(F.gelu(self.up(x.flatten(2).transpose(1, 2))))
        return self.point(tokens.transpose(1, 2).reshape(x.shape)).relu()


def _broken_islands(program: torch.export.ExportedProgram) -> list[str]:
    """Ops fed by a layout op applied to a dequantize (the island torn apart)."""
    return [
        n.name
        for n in program.graph.nodes
        for a in n.all_input_nodes
        if op_name(a.target) in LAYOUT_OPS and is_dequantize(a.args[0]) and op_name(n.target).startswith("aten::")
    ]


def _ops(program: torch.export.ExportedProgram, names: tuple[str, ...]) -> int:
    return sum(op_name(n.target) in names for n in program.graph.nodes)


@pytest.mark.parametrize("direction", ["linear_to_conv", "conv_to_linear"])
def test_quantize_then_rewrite_keeps_the_quantized_outputs_and_the_islands(direction):
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    program = quantized(demo_model(), x)
    res = fxsurgery.rewrite(program, x, direction)
    pattern = "qlinear->conv" if direction == "linear_to_conv" else "qconv->linear"
    expected = {"classifier.1", "classifier.4", "aux"} if direction == "linear_to_conv" else {"features.pointwise1"}
    assert {s.name for s in res.rewritten} >= expected and {s.pattern for s in res.sites} == {pattern}
    assert res.validation and isinstance(res.program, torch.export.ExportedProgram)
    assert torch.equal(res.program.module()(x), program.module()(x))  # the quantized original, bit for bit
    old = "aten::linear" if direction == "linear_to_conv" else "aten::conv2d"
    assert _ops(res.program, (old,)) == _ops(program, (old,)) - len(res.rewritten)  # none left behind, dead
    assert _broken_islands(res.program) == [] == _broken_islands(program)
    assert "int8 island" in res.notes[0] and "bit-identical" in res.notes[0]


def test_the_conv_weight_is_the_int8_constant_reshaped_then_dequantized():
    """``dq(constant)`` as ExecuTorch's partitioners need it, the constant a view of the original int8 tensor."""
    x = torch.randn(2, 3, 32, 32)
    program = quantized(demo_model(), x)
    res = fxsurgery.linear_to_conv(program, x)
    convs = [n for n in res.program.graph.nodes if op_name(n.target) == "aten::convolution"]
    assert len(convs) == 3
    new_state = {**res.program.state_dict, **res.program.constants}
    old_storage = {t.untyped_storage().data_ptr() for t in {**program.state_dict, **program.constants}.values()}
    for conv in convs:
        dq = conv.args[1]
        assert is_dequantize(dq) and dq.args[0].op == "placeholder"
        spec = next(s for s in res.program.graph_signature.input_specs if s.arg.name == dq.args[0].name)
        weight = new_state[spec.target]
        assert weight.dtype == torch.int8 and weight.dim() == 4
        assert weight.untyped_storage().data_ptr() in old_storage  # a view: no copy of the weights


def test_a_convert_pt2e_graph_module_is_rewritten_too():
    """The fx front end listed 0 sites on it and called validation passed."""
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(0)
    prepared = _prepared(demo_model().eval(), x)
    prepared(x)
    converted = convert_pt2e(prepared)
    res = fxsurgery.linear_to_conv(converted, x)
    assert len(res.rewritten) == 3 and res.program is None
    assert torch.equal(res.module(x), converted(x))


def test_tokens_are_rewritten_as_rows_with_views_only():
    x = torch.randn(2, 8, 4, 4)
    program = quantized(Tokens(), x)
    res = fxsurgery.linear_to_conv(program, x)
    assert [s.name for s in res.rewritten] == ["up", "down"]
    permutes = ("aten::permute", "aten::permute_copy", "aten::transpose", "aten::t")
    assert _ops(res.program, permutes) == _ops(program, permutes)  # views only: no transpose added
    assert torch.equal(res.program.module()(x), program.module()(x))
    back = fxsurgery.conv_to_linear(program, x)
    assert [s.name for s in back.rewritten] == ["point"]
    assert torch.equal(back.program.module()(x), program.module()(x))


class Grouped(nn.Module):
    """A Linear whose int8 weight torchao's ``dequantize_affine`` dequantizes per block of ``group`` inputs."""

    def __init__(self, in_shape: tuple[int, ...], out: int, group: int) -> None:
        super().__init__()
        k = 1
        for d in in_shape:
            k *= d
        g = torch.Generator().manual_seed(0)
        self.register_buffer("w", torch.randint(-8, 8, (out, k), generator=g, dtype=torch.int8))
        self.register_buffer("scale", torch.rand(out, k // group, generator=g) / 50 + 0.01)
        self.register_buffer("zero", torch.zeros(out, k // group, dtype=torch.int8))
        self.bias = nn.Parameter(torch.randn(out, generator=g))
        self.group = group

    def forward(self, x):
        w = torch.ops.torchao.dequantize_affine(self.w, [1, self.group], self.scale, self.zero, torch.int8, -8, 7)
        return F.linear(x.flatten(1), w, self.bias)


@pytest.mark.parametrize(("in_shape", "group"), [((32, 1, 1), 8), ((4, 4, 4), 32), ((4, 4, 4), 4), ((4, 4, 4), 2)])
def test_per_block_weights_keep_their_blocks(in_shape, group):
    model = Grouped(in_shape, 6, group).eval()
    x = torch.randn(3, *in_shape)
    program = torch.export.export(model, (x,))
    res = fxsurgery.linear_to_conv(program, x)
    assert [s.pattern for s in res.rewritten] == ["qlinear->conv"]
    assert torch.allclose(res.program.module()(x), model(x), rtol=0, atol=1e-5)  # the same blocks, the same scales


def test_a_block_that_is_no_run_of_the_kernel_is_skipped_with_its_reason():
    model = Grouped((3, 5, 5), 4, 15).eval()  # 15 elements: not whole rows of the 5x5 map nor whole maps
    x = torch.randn(2, 3, 5, 5)
    res = fxsurgery.linear_to_conv(torch.export.export(model, (x,)), x)
    (site,) = res.sites
    assert site.status == "skipped" and "block size [1, 15]" in site.reason and "quantized weight" in site.reason


def test_a_weight_quantized_on_another_axis_is_a_skip_naming_quantization():
    class Axis1(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("w", torch.randint(-8, 8, (5, 6), dtype=torch.int8))
            self.register_buffer("scale", torch.full((6,), 0.1))
            self.register_buffer("zero", torch.zeros(6, dtype=torch.int64))

        def forward(self, x):
            dq = torch.ops.quantized_decomposed.dequantize_per_channel
            return F.linear(x, dq(self.w, self.scale, self.zero, 1, -127, 127, torch.int8))

    x = torch.randn(2, 6)
    res = fxsurgery.linear_to_conv(torch.export.export(Axis1(), (x,)), x)
    (site,) = res.sites
    assert site.status == "skipped" and "quantized weight" in site.reason and "convert_pt2e" in site.reason


@pytest.mark.parametrize("qat", [False, True])
def test_a_prepared_model_is_refused_with_what_to_do(qat):
    x = torch.randn(2, 3, 32, 32)
    prepared = _prepared(demo_model(), x, qat=qat)
    with pytest.raises(fxsurgery.InputError, match="fake-quant" if qat else "an observer") as e:
        fxsurgery.linear_to_conv(prepared, x)
    assert "convert_pt2e" in str(e.value)


def test_a_qat_model_trained_then_converted_is_rewritten_as_any_quantized_graph():
    """QAT: prepare_qat_pt2e, a few training steps (fake-quant learns its ranges), convert_pt2e: then the same
    rules, and the quantized original's outputs bit for bit."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32)
    prepared = _prepared(demo_model(), x, qat=True)
    optimizer = torch.optim.SGD(prepared.parameters(), lr=1e-3)
    for _ in range(3):
        optimizer.zero_grad()
        prepared(x).square().mean().backward()
        optimizer.step()
    move_exported_model_to_eval(prepared)
    program = torch.export.export(convert_pt2e(prepared), (x,), strict=False)
    res = fxsurgery.linear_to_conv(program, x)
    assert {s.name for s in res.rewritten} >= {"classifier.1", "classifier.4", "aux"}
    assert torch.equal(res.program.module()(x), program.module()(x)) and _broken_islands(res.program) == []


def test_torchao_tensor_subclass_weights_are_a_reason_not_an_internal_error():
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    model = demo_model().eval()
    quantize_(model, Int8WeightOnlyConfig())
    x = torch.randn(2, 3, 32, 32)
    res = fxsurgery.linear_to_conv(model, x)
    assert len(res.sites) == 3 and not res.rewritten
    assert all("quantized tensor subclass" in s.reason and "PT2E" in s.reason for s in res.sites)


def test_quantize_then_rewrite_lowers_to_xnnpack_as_the_original_does():
    pytest.importorskip("executorch", reason="ExecuTorch is optional: pip install fxsurgery[executorch]")
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    from fxsurgery.runtimes.xnnpack import execute

    def run_pte(program):
        lowered = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
        delegated = [n for n in lowered.exported_program().graph.nodes if "quantized_decomposed" in str(n.target)]
        pte = lowered.to_executorch().buffer
        return execute(pte, [x])[0], delegated

    x = torch.randn(2, 8, 4, 4)
    program = quantized(Tokens(), x)
    for direction in ("linear_to_conv", "conv_to_linear"):
        res = fxsurgery.rewrite(program, x, direction)
        (want, left_want), (got, left_got) = run_pte(program), run_pte(res.program)
        assert left_got == [] == left_want  # every quantized op inside the XNNPACK delegate
        assert torch.equal(got, want)


def test_rewrite_then_quantize_for_executorch_adds_no_requantization():
    """The executorch-xnnpack target's batch layout: PT2E quantizes the rewritten model as it does the original."""
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    model = demo_model().eval()
    rewritten = fxsurgery.linear_to_conv(model, x, target="executorch-xnnpack").module
    original_q, rewritten_q = quantized(model, x), quantized(rewritten, x)
    quantizes = ("quantized_decomposed::quantize_per_tensor",)
    assert _ops(rewritten_q, quantizes) == _ops(original_q, quantizes)
    step = float(next(n for n in original_q.graph.nodes if n.op == "output").args[0][0].args[1])
    probe = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))  # not the calibration data
    a, b = original_q.module()(probe), rewritten_q.module()(probe)
    assert float(((a - b).abs() <= step * 1.001).float().mean()) >= 0.99


def test_the_cli_rewrites_a_quantized_pt2_and_cross_checks_it_in_onnxruntime(tmp_path):
    """torch.export.load needs the quantized ops registered; onnxruntime runs the q/dq pairs as int8 kernels,
    compared to the quantized tolerance."""
    import subprocess
    import sys

    x = torch.randn(2, 3, 32, 32)
    torch.export.save(quantized(demo_model(), x), str(tmp_path / "q.pt2"))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fxsurgery",
            "rewrite",
            str(tmp_path / "q.pt2"),
            "--to",
            "conv",
            "--out",
            str(tmp_path / "out"),
        ],  # fmt: skip
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "overall: PASSED" in proc.stdout
    rewritten = torch.export.load(str(tmp_path / "out" / "rewritten.pt2"))
    ops = [op_name(n.target) for n in rewritten.graph.nodes]
    assert ops.count("aten::convolution") == 3 and "aten::linear" not in ops  # the 3 Linears, now convs


def test_a_pass_run_outside_a_program_skips_quantized_sites_and_says_where_to_run_it():
    from fxsurgery.engine.passes import LinearToConvPass, transform

    x = torch.randn(2, 3, 32, 32)
    program = quantized(demo_model(), x)
    alone = LinearToConvPass()
    alone(torch.export.export(program.module(), (x,)).graph_module)  # as to_edge_transform_and_lower would run it
    assert alone.sites and all(s.status == "skipped" and "transform(program" in s.reason for s in alone.sites)
    inside = LinearToConvPass()
    new = transform(program, inside)
    assert len([s for s in inside.sites if s.rewritten]) == 3
    assert torch.equal(new.module()(x), program.module()(x))


def test_a_model_holding_a_quantized_graph_is_rewritten_as_one():
    """A converted graph inside a wrapper module: not the fx front end's 0 sites and "passed"."""

    class Wrapper(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x) * 2

    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(0)
    prepared = _prepared(demo_model().eval(), x)
    prepared(x)
    wrapped = Wrapper(convert_pt2e(prepared))
    res = fxsurgery.linear_to_conv(wrapped, x)
    assert len(res.rewritten) == 3 and torch.equal(res.module(x), wrapped(x))
    plain = fxsurgery.linear_to_conv(wrapped, x, validate=False)
    assert plain.validation is None and "validated" not in plain.notes[0]
