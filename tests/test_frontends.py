"""The two front ends: torch.fx and torch.export (its ATen graph raised back to module calls), and the choice
between them (``frontend="auto"``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxsurgery
from fxsurgery.capture import export_model, raise_program, working_copy
from tests.conftest import run_surgery


class Head(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc1, self.fc2 = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4 * 4 * 4, 6), nn.Linear(6, 5)
        self.free = nn.Parameter(torch.randn(5, 5))

    def forward(self, x):
        y = torch.relu(self.fc1(self.conv(x).flatten(1)))
        return F.linear(self.fc2(y), self.free)  # a functional Linear on a parameter of the root


class Untraceable(Head):
    def forward(self, x):
        if x.shape[-1] > 1:  # fx cannot branch on a shape; torch.export specialises it
            x = x * 1.0
        return super().forward(x)


def test_the_aten_graph_is_raised_to_module_calls_and_torch_ops():
    m = Head().eval()
    program = export_model(working_copy(m), (torch.randn(2, 3, 4, 4),))
    gm = raise_program(program, working_copy(m))
    calls = [str(n.target) for n in gm.graph.nodes if n.op == "call_module"]
    assert calls == ["conv", "fc1", "fc2"]
    targets = {n.target for n in gm.graph.nodes if n.op == "call_function"}
    assert {torch.relu, torch.flatten, F.linear} <= targets  # the root's own F.linear stays functional
    assert not any(isinstance(t, torch._ops.OpOverload) for t in targets), targets
    assert gm.conv.weight.data_ptr() == m.conv.weight.data_ptr()  # the model's layers, viewing its parameters
    x = torch.randn(3, 3, 4, 4)  # another batch size: the export's batch is dynamic
    torch.testing.assert_close(gm(x), m(x))


@pytest.mark.parametrize("direction", ["linear_to_conv", "conv_to_linear"])
def test_export_rewrites_what_fx_rewrites(direction):
    m = Head().eval()
    x = torch.randn(2, 3, 4, 4)
    by_fx = fxsurgery.rewrite(m, x, direction, frontend="fx")
    by_export = run_surgery(direction, m, x, frontend="export",
                            rewritten=[s.name.replace("linear", "linear_2") for s in by_fx.rewritten])  # fmt: skip
    # module sites are named by their paths in both; a functional site by its graph node, which each tracer names
    assert [(s.name.replace("linear_2", "linear"), s.pattern, s.status) for s in by_export.sites] == [
        (s.name, s.pattern, s.status) for s in by_fx.sites]  # fmt: skip
    assert by_export.frontend == "export" and by_export.notes[0] == "front end: export (as asked)"


def test_auto_keeps_fx_when_it_traces_the_whole_model():
    res = fxsurgery.linear_to_conv(Head().eval(), torch.randn(2, 3, 4, 4))
    assert res.frontend == "fx" and res.notes[0] == "front end: fx (torch.fx traced the whole model)"


def test_auto_takes_export_where_fx_cannot_trace_and_says_why():
    m = Untraceable().eval()
    res = run_surgery("linear_to_conv", m, torch.randn(2, 3, 4, 4), rewritten=["fc1", "fc2", "linear_2"])
    assert res.frontend == "export"
    assert res.notes[0] == ("front end: export (torch.fx did not trace the whole model; torch.export rewrites 3 of 3 "
                            "candidates, fx 0 of 2)")
    fx_only = fxsurgery.linear_to_conv(m, torch.randn(2, 3, 4, 4), frontend="fx")
    assert not fx_only.rewritten  # the fx descent reaches fc1 alone, not the flatten it reads


def test_a_batch_of_one_is_exported_with_a_dynamic_batch():
    m = Untraceable().eval()
    res = fxsurgery.linear_to_conv(m, torch.randn(1, 3, 4, 4), frontend="export")
    for n in (1, 4):
        x = torch.randn(n, 3, 4, 4)
        torch.testing.assert_close(res.module(x), m(x))
    assert not any("fixed the batch" in n for n in res.notes)


@pytest.mark.parametrize("batch", [1, 3])
def test_a_static_batch_is_captured_at_the_examples_batch_when_asked(batch):
    """``dynamic_batch=False`` (``--static-batch``): the graph is exported at the example's batch (one export, no
    symbolic batch to reason about), and refuses another batch with a clear error; validation says what it ran."""
    m = Untraceable().eval()
    res = fxsurgery.linear_to_conv(m, torch.randn(batch, 3, 4, 4), frontend="export", dynamic_batch=False)
    assert {"fc1", "fc2"} <= {s.name for s in res.rewritten} and res.validation.batch_sizes == (batch,)
    assert any("fixed the batch" in n for n in res.notes)
    x = torch.randn(batch, 3, 4, 4)
    torch.testing.assert_close(res.module(x), m(x))
    with pytest.raises(RuntimeError, match=f"exported with size {batch} on dim 0"):
        res.module(torch.randn(batch + 1, 3, 4, 4))


def test_a_dim_the_export_kept_static_is_checked_with_a_clear_error():
    class Pool(nn.Module):  # accepts any image size itself
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 4, 1), nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(self.conv(x).mean((2, 3)))

    m = Pool().eval()
    res = fxsurgery.linear_to_conv(m, torch.randn(2, 3, 4, 4), frontend="export")
    assert [s.name for s in res.rewritten] == ["fc"]
    x = torch.randn(5, 3, 4, 4)
    torch.testing.assert_close(res.module(x), m(x))  # the batch stays dynamic
    with pytest.raises(RuntimeError, match=r"input 'x' has shape \(2, 3, 6, 6\), but this graph was exported with "
                                           r"size 4 on dim 2"):  # fmt: skip
        res.module(torch.randn(2, 3, 6, 6))



def test_hooks_keep_fx_and_export_refuses_them():
    m = Untraceable().eval()
    seen = []
    m.fc1.register_forward_hook(lambda mod, args, out: seen.append(out.shape))
    with pytest.raises(fxsurgery.TraceError, match="forward hooks .*fc1 has hooks.*frontend='fx'"):
        fxsurgery.linear_to_conv(m, torch.randn(2, 3, 4, 4), frontend="export")
    res = fxsurgery.linear_to_conv(m, torch.randn(2, 3, 4, 4))
    assert res.frontend == "fx" and "torch.export failed too" in res.notes[0]


def test_a_weight_read_by_other_code_is_tied():
    class Tied(nn.Module):  # GPT-2-like; torch.export names the shared table once, and the embedding reads it
        def __init__(self):
            super().__init__()
            self.embed, self.conv, self.head = nn.Embedding(10, 16), nn.Conv2d(3, 4, 1), nn.Linear(16, 10)
            self.head.weight = self.embed.weight

        def forward(self, x, ids):
            return self.head(self.conv(x).flatten(1)) + self.embed(ids).sum(1)[:, :10]

    m = Tied().eval()
    inputs = (torch.randn(2, 3, 2, 2), torch.randint(0, 10, (2, 3)))
    for frontend in ("fx", "export"):
        res = fxsurgery.linear_to_conv(m, inputs, frontend=frontend)
        assert "(tied weights)" in {s.name: s.reason for s in res.sites}["head"], (frontend, res.summary())
        assert res.module.head.weight is res.module.embed.weight if frontend == "fx" else True


def test_constants_the_export_lifts_are_kept():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 4, 1), nn.Linear(16, 5)

        def forward(self, x):
            if x.shape[0] > 0:  # untraceable for fx
                x = x * torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1, 1)
            return self.fc(self.conv(x).flatten(1))

    run_surgery("linear_to_conv", Scaled().eval(), torch.randn(2, 3, 2, 2), frontend="export", rewritten=["fc"])


def test_unknown_frontend_is_an_input_error():
    with pytest.raises(fxsurgery.InputError, match="frontend must be one of"):
        fxsurgery.linear_to_conv(Head(), torch.randn(2, 3, 4, 4), frontend="dynamo")


def test_an_exported_program_in_gives_a_rewritten_program_out(tmp_path):
    import numpy as np
    import onnxruntime as ort

    m = Head().eval()
    x = torch.randn(2, 3, 4, 4)
    program = torch.export.export(m, (x,), dynamic_shapes=({0: torch.export.Dim.AUTO},), strict=False)
    res = fxsurgery.linear_to_conv(program, None, precision="float64")  # the program's own example inputs
    assert [s.name for s in res.rewritten] == ["fc1", "fc2", "linear_2"] and res.frontend == "export"
    ops = {str(n.target) for n in res.program.graph.nodes if n.op == "call_function"}
    assert "aten.conv2d.default" in ops and "aten.linear.default" not in ops  # the rewrite, in the program
    torch.export.save(res.program, tmp_path / "rewritten.pt2")
    loaded = torch.export.load(tmp_path / "rewritten.pt2").module()
    for n in (1, 2, 5):  # the batch stays dynamic
        xn = torch.randn(n, 3, 4, 4)
        torch.testing.assert_close(loaded(xn), m(xn), rtol=1e-4, atol=1e-5)
    torch.onnx.export(res.program, (x,), str(tmp_path / "rewritten.onnx"), dynamo=True)
    session = ort.InferenceSession(str(tmp_path / "rewritten.onnx"), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    np.testing.assert_allclose(got, m(x).detach().numpy(), rtol=1e-4, atol=1e-5)


def test_an_exported_program_is_refused_by_the_fx_front_end():
    program = torch.export.export(Head().eval(), (torch.randn(2, 3, 4, 4),), strict=False)
    with pytest.raises(fxsurgery.InputError, match="through the export front end"):
        fxsurgery.linear_to_conv(program, None, frontend="fx")


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_gpt2_style_conv1d_is_a_linear_with_a_transposed_weight(frontend):
    class Conv1D(nn.Module):  # transformers.pytorch_utils.Conv1D, recognised by name and attributes
        def __init__(self, nf, nx):
            super().__init__()
            self.nf, self.nx = nf, nx
            self.weight, self.bias = nn.Parameter(torch.randn(nx, nf)), nn.Parameter(torch.randn(nf))

        def forward(self, x):
            size_out = x.size()[:-1] + (self.nf,)
            return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(size_out)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln, self.fc, self.proj = nn.LayerNorm(8), Conv1D(16, 8), Conv1D(8, 16)

        def forward(self, x):
            return x + self.proj(torch.relu(self.fc(self.ln(x))))

    m = Block().eval()
    res = run_surgery("linear_to_conv", m, torch.randn(2, 5, 8), token_layout=True, frontend=frontend,
                      rewritten=["fc", "proj"])  # fmt: skip
    assert res.module.get_submodule("fc").weight.data_ptr() == m.fc.weight.data_ptr()
    state = fxsurgery.original_state_dict(res.module)
    assert state["fc.weight"].shape == (8, 16) and torch.equal(state["fc.weight"], m.fc.weight)


def test_the_export_front_end_keeps_every_state_dict_key():
    class WithAux(Untraceable):
        def __init__(self):
            super().__init__()
            self.aux = nn.Linear(4, 2)  # used in training only
            self.register_buffer("loss_weight", torch.ones(5))

    m = WithAux().eval()
    res = fxsurgery.linear_to_conv(m, torch.randn(2, 3, 4, 4), frontend="export")
    assert set(fxsurgery.original_state_dict(res.module)) == set(m.state_dict())
    fxsurgery.load_state_dict(res.module, m.state_dict())  # the original checkpoint loads
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(res.module(x), m(x))


def test_an_exported_graph_keeps_every_modules_training_flag_and_guards_its_mode():
    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Dropout(0.5), nn.Flatten(),
                      nn.Linear(64, 5)).eval()  # fmt: skip
    m[2].train()  # a dropout left in training mode: its own flag, as the fx path keeps it
    res = fxsurgery.linear_to_conv(m, torch.randn(2, 3, 4, 4), frontend="export", validate=False)
    assert res.module.get_submodule("2").training and not res.module.training
    with pytest.raises(RuntimeError, match="traced in eval mode"):
        res.module.train()(torch.randn(2, 3, 4, 4))  # batch norm and dropout are fixed to the traced mode


def test_attention_decomposed_by_the_export_at_batch_one_is_not_a_flattened_map():
    """MultiheadAttention's out_proj reads ``permute(S, B, H, D).reshape(B * S, E)``: at batch 1 its dim 0 equals the
    map's, but the reshape computes it (``bsz * tgt_len``) instead of reading the batch size."""

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, x):
            return self.attn(x, x, x, need_weights=False)[0]

    res = run_surgery("linear_to_conv", Attention().eval(), torch.randn(1, 5, 8), rewritten=[], frontend="export")
    assert "first dim is computed" in {s.pattern: s.reason for s in res.skipped if "reshape" in s.reason}.get(
        "flatten->linear", "")


class InPlaceHead(nn.Module):
    """In-place activations and adds as torchvision writes them (MNASNet, MobileNet, EfficientNet, VGG): the export
    keeps them as ``aten.relu_``, ``aten.dropout_``, ``aten.hardtanh_``, ``aten.add_`` ..."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc1, self.fc2, self.fc3 = nn.Conv2d(3, 8, 1), nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 4)
        self.act = nn.Sequential(nn.ReLU6(inplace=True), nn.Dropout(0.2, inplace=True), nn.SiLU(inplace=True))
        self.hs, self.relu = nn.Hardswish(inplace=True), nn.ReLU(inplace=True)

    def forward(self, x):
        y = self.relu(self.conv(x)).mean((2, 3))
        z = self.act(self.fc1(y))
        z += self.fc2(z)
        return self.fc3(self.hs(z))


@pytest.mark.parametrize("direction", ["linear_to_conv", "conv_to_linear"])
def test_in_place_ops_are_raised_and_rewritten_as_fx_rewrites_them(direction):
    m = InPlaceHead().eval()
    x = torch.randn(2, 3, 4, 4)
    by_fx = fxsurgery.rewrite(m, x, direction, frontend="fx")
    assert len(by_fx.rewritten) == (3 if direction == "linear_to_conv" else 1), by_fx.summary()
    by_export = run_surgery(direction, m, x, frontend="export", rewritten=[s.name for s in by_fx.rewritten])
    assert [(s.name, s.pattern, s.status) for s in by_export.sites] == [(s.name, s.pattern, s.status)
                                                                         for s in by_fx.sites]  # fmt: skip
    gm = raise_program(export_model(working_copy(m), (x,)), working_copy(m))
    assert not any(isinstance(n.target, torch._ops.OpOverload) for n in gm.graph.nodes), gm.graph


def test_check_takes_an_exported_program_and_its_example_inputs(tmp_path):
    from fxsurgery.models import demo_model

    model, x = demo_model().eval(), torch.randn(2, 3, 32, 32)
    program = torch.export.export(model, (x,))
    report = fxsurgery.check(program, None, "linear", tmp_path)
    assert report.passed and report.onnx.passed and report.surgery.frontend == "export"
    assert len(report.surgery.rewritten) >= 3
    with torch.no_grad():
        torch.testing.assert_close(report.surgery.module(x), model(x), rtol=1e-4, atol=1e-5)


class VarArgs(nn.Module):
    """A forward that takes its inputs as ``*inputs`` (a wrapper's usual signature)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, *inputs):
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(inputs[0] + inputs[1], 1), 1))


def test_a_forward_taking_star_args_goes_through_torch_export_with_a_dynamic_batch():
    """torch.export reads ``dynamic_shapes`` by the forward's parameters: the inputs a ``*inputs`` parameter takes
    are one entry there (given one entry per input, it refused: "inputs has 1 elements")."""
    model, xs = VarArgs().eval(), (torch.randn(2, 8, 4, 4), torch.randn(2, 8, 4, 4))
    res = fxsurgery.linear_to_conv(model, xs, frontend="export")
    assert res.frontend == "export" and len(res.rewritten) == 1 and res.validation.passed
    x3 = (torch.randn(3, 8, 4, 4), torch.randn(3, 8, 4, 4))
    torch.testing.assert_close(res.module(*x3), model(*x3), rtol=1e-5, atol=1e-6)


class Stateful(nn.Module):
    """What an unlift must carry: a buffer the forward updates, a parameter, a constant tensor held as a plain
    attribute, a no_grad region (a graph of its own), keyword inputs and a dict of outputs."""

    def __init__(self):
        super().__init__()
        self.bn, self.fc = nn.BatchNorm1d(4), nn.Linear(4, 3)
        self.register_buffer("steps", torch.zeros(()))
        self.shift = torch.tensor([0.5, -1.0, 2.0])

    def forward(self, x, scale=None):
        self.steps.add_(1)
        with torch.no_grad():
            frozen = self.fc(x) * 2
        y = self.fc(self.bn(x)) + self.shift
        return {"y": y * scale, "frozen": frozen, "steps": self.steps + 0}


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("functional", [False, True])
def test_the_exported_graph_is_unlifted_and_raised_to_what_the_model_computes(training, functional):
    """Unlifted by fxsurgery (torch.export's training IR), or by ``ExportedProgram.module()`` (a program made
    functional, which returns the buffers' new values): the raised module moves the buffers as the model does."""
    from fxsurgery.capture.unlift import unlift

    m = Stateful().train(training)
    x, scale = torch.randn(3, 4), torch.tensor(3.0)
    program = torch.export.export(working_copy(m), (x,), {"scale": scale}, strict=False)
    program = program.run_decompositions({}) if functional else program
    graph, _ = unlift(program)
    assert any(n.op == "call_module" and n.target == "_guards_fn" for n in graph.nodes) == functional
    assert [n.name for n in graph.nodes if n.op == "placeholder"] == ["x", "scale"]
    ours, reference = raise_program(program, working_copy(m)), working_copy(m)
    for _ in range(2):  # the buffers move alike, call after call
        got, want = ours(x, scale=scale), reference(x, scale=scale)
        assert got.keys() == want.keys()
        for key in want:
            torch.testing.assert_close(got[key], want[key])
    buffers = dict(ours.named_buffers())  # (the constant is a buffer there: .double() converts it as the model)
    for name, value in reference.named_buffers():
        torch.testing.assert_close(buffers[name], value)
    assert m.steps.item() == 0  # the user's model untouched


def test_the_collector_skips_what_a_step_holds_and_the_process_settings_come_back():
    import gc

    from fxsurgery.capture.heap import settled_heap

    assert gc.get_freeze_count() == 0
    with settled_heap():
        assert gc.get_freeze_count() > 0  # what was alive at the start: not walked during the step
        with settled_heap():  # (nested: the outer one's)
            pass
        assert gc.get_freeze_count() > 0
    assert gc.get_freeze_count() == 0 and gc.isenabled()
    gc.freeze()  # the process's own frozen objects: left frozen
    try:
        frozen = gc.get_freeze_count()
        with settled_heap():
            pass
        assert gc.get_freeze_count() == frozen
    finally:
        gc.unfreeze()
    gc.disable()  # the collector off: left off, nothing frozen
    try:
        with settled_heap():
            assert gc.get_freeze_count() == 0
        assert not gc.isenabled()
    finally:
        gc.enable()
