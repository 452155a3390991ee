"""to="auto": per-site choice measured on the runtime, whole-model guard. No timing is asserted, only that the
decision follows the measurements the report shows and that the result is exact."""

from __future__ import annotations

import pytest
import torch

import fxsurgery
from fxsurgery.models import demo_model
from fxsurgery.plan.auto import MARGIN


@pytest.mark.parametrize("runtime", ["torch", "onnxruntime"])
def test_auto_reports_and_follows_its_measurements(runtime):
    model = demo_model()
    x = torch.randn(4, 3, 32, 32)
    res = fxsurgery.rewrite(model, x, "auto", runtime=runtime)
    assert res.direction == "auto" and res.validation.passed
    t = res.timings
    assert t["runtime"] == runtime
    names = {c["site"] for c in t["sites"]}
    assert names == {"classifier.1", "classifier.4", "aux", "features.pointwise1", "features.pointwise2", "down"}
    for c in t["sites"]:
        assert c["chosen"] == ("rewritten" if c["ratio"] < 1.0 else "original")
    whole = t["whole_model"]
    assert set(whole) == {"auto", "all-conv", "all-linear"}
    best = min(whole, key=lambda k: whole[k]["ratio"])
    assert t["chosen"] == (best if whole[best]["ratio"] <= 1.0 - MARGIN else "original")
    kept = {s.name for s in res.rewritten}
    if t["chosen"] == "original":
        assert not kept
    with torch.no_grad():
        torch.testing.assert_close(res.module.eval()(x), model(x), rtol=1e-4, atol=1e-5)
    assert "auto (" in res.summary()
    # each site says which pass considered it; its pattern reads as in a one-direction result
    assert {(s.direction, s.pattern) for s in res.sites} == {
        ("linear_to_conv", "flatten->linear"), ("linear_to_conv", "chain-linear"), ("linear_to_conv", "pool->linear"),
        ("conv_to_linear", "conv1x1"), ("conv_to_linear", "conv1x1-strided")}  # fmt: skip


def test_auto_rejects_unknown_runtime():
    with pytest.raises(fxsurgery.InputError, match="runtime must be"):
        fxsurgery.rewrite(demo_model(), torch.randn(2, 3, 32, 32), "auto", runtime="tvm")


def test_auto_leaves_a_training_model_in_training_mode():
    model = demo_model().train()
    flags = [m.training for m in model.modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    fxsurgery.rewrite(model, torch.randn(4, 3, 32, 32), "auto", runtime="torch", validate=False)
    assert [m.training for m in model.modules()] == flags
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_auto_with_the_token_layout_measures_blocks_and_is_exact():
    from tests.test_transformers import AttentionBlock

    model = AttentionBlock().eval()
    x = torch.randn(3, 5, 16)
    res = fxsurgery.rewrite(model, x, "auto", runtime="torch", token_layout=True)
    choices = {c["site"]: c for c in res.timings["sites"] if c["direction"] == "linear_to_conv"}
    assert set(choices) == {"attn", "attn.out_proj", "fc1", "fc2"}
    assert all("ratio" in choices[n] for n in ("attn", "fc1", "fc2"))  # each measured alone
    assert choices["attn.out_proj"]["chosen"] == choices["attn"]["chosen"]  # follows its attention
    with torch.no_grad():
        torch.testing.assert_close(res.module.eval()(x), model(x), rtol=1e-4, atol=1e-5)


def test_auto_decides_transformer_sites_per_block():
    from tests.test_transformers import AttentionBlock

    class Blocks(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.Sequential(AttentionBlock(), AttentionBlock())

        def forward(self, x):
            return self.blocks(x)

    model = Blocks().eval()
    x = torch.randn(3, 5, 16)
    res = fxsurgery.rewrite(model, x, "auto", runtime="torch", token_layout=True)
    choices = [c for c in res.timings["sites"] if c["direction"] == "linear_to_conv"]
    assert {c["site"] for c in choices} == {f"blocks.{i}.{n}" for i in (0, 1)
                                            for n in ("attn", "attn.out_proj", "fc1", "fc2")}  # fmt: skip
    assert {c["block"] for c in choices} == {"blocks.0", "blocks.1"}
    for block in ("blocks.0", "blocks.1"):
        mine = [c for c in choices if c["block"] == block]
        assert len({c["chosen"] for c in mine}) == 1  # one decision per block
        assert all(c["chosen"] == ("rewritten" if c["ratio"] < 1.0 else "original") for c in mine)
    with torch.no_grad():
        torch.testing.assert_close(res.module.eval()(x), model(x), rtol=1e-4, atol=1e-5)


def test_a_choice_that_amounts_to_another_candidate_is_that_candidate():
    from torch import nn

    from fxsurgery.plan.auto import _same_as
    from fxsurgery.report import Site, SurgeryResult

    def result(direction, *names):
        return SurgeryResult(nn.Identity(), [Site(n, "p", "rewritten") for n in names], None, direction)

    full = {"linear_to_conv": result("linear_to_conv", "fc1", "fc2"), "conv_to_linear": result("conv_to_linear", "c")}
    assert _same_as(full, {"linear_to_conv": [], "conv_to_linear": []}) == "original"
    assert _same_as(full, {"linear_to_conv": ["fc2", "fc1"], "conv_to_linear": []}) == "all-conv"
    assert _same_as(full, {"linear_to_conv": [], "conv_to_linear": ["c"]}) == "all-linear"
    assert _same_as(full, {"linear_to_conv": ["fc1"], "conv_to_linear": []}) is None  # a mix: built and measured
    assert _same_as(full, {"linear_to_conv": ["fc1", "fc2"], "conv_to_linear": ["c"]}) is None


def test_settled_timing_gives_the_answer_every_pair_would(monkeypatch):
    """``interleaved(..., settle=1.0)`` may stop early; on which side of 1 its median lies must not change. A fake
    clock runs each call for a set time: a always 1.0, b the ratio of its pair."""
    import random

    from fxsurgery.runtimes import timing

    rng = random.Random(0)
    for _ in range(300):
        ratios = [rng.choice([0.6, 0.9, 1.0, 1.1, 1.4]) for _ in range(5)]
        results = {}
        for settle in (None, 1.0):
            clock = [0.0]
            costs = iter([1.0] * 3 + ratios)  # b: two warm-up calls and the calibration call, then one per pair

            def a(clock=clock):
                clock[0] += 1.0

            def b(clock=clock, costs=costs):
                clock[0] += next(costs)

            monkeypatch.setattr(timing.time, "perf_counter", lambda clock=clock: clock[0])
            results[settle] = timing.interleaved(a, b, 5, min_sample_s=0.0, settle=settle)
        full, settled = results[None], results[1.0]
        assert full.pairs == 5 and 3 <= settled.pairs <= 5
        assert (settled.median < 1.0) == (full.median < 1.0), ratios
        if sum(r < 1.0 for r in ratios[:3]) in (0, 3):
            assert settled.pairs == 3  # three pairs on one side decide the median of five


def test_a_model_the_torchscript_exporter_refuses_is_timed_from_a_dynamo_export(monkeypatch, tmp_path):
    from fxsurgery.runtimes import timing

    calls = []
    from fxsurgery.runtimes import ort

    export = ort.export_onnx

    def picky(module, inputs, path, *, exporter="dynamo", **kw):
        calls.append(exporter)
        if exporter == "torchscript":
            raise RuntimeError("unsupported by the TorchScript exporter")
        export(module, inputs, path, exporter=exporter, **kw)

    monkeypatch.setattr(ort, "export_onnx", picky)
    model, x = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1)).eval(), torch.randn(2, 3, 5, 5)
    run = timing.runner(model, x, "onnxruntime", tmp_path, 1, exporter="torchscript")
    assert calls == ["torchscript", "dynamo"]
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(run()[0]), model(x), rtol=1e-5, atol=1e-6)


def test_auto_measures_on_openvino():
    pytest.importorskip("openvino", reason='OpenVINO is optional: pip install "fxsurgery[openvino]"')
    model, x = demo_model(), torch.randn(4, 3, 32, 32)
    res = fxsurgery.rewrite(model, x, "auto", runtime="openvino")
    assert res.timings["runtime"] == "openvino" and res.validation.passed
    assert all(c["chosen"] == ("rewritten" if c["ratio"] < 1.0 else "original") for c in res.timings["sites"])


@torch.library.custom_op("fxsurgery_test::doubled", mutates_args=())
def _doubled(x: torch.Tensor) -> torch.Tensor:
    return 2 * x


@_doubled.register_fake
def _(x):
    return torch.empty_like(x)


class NoOnnx(torch.nn.Module):
    """A conv head around an op that has no ONNX function: onnxruntime cannot run it."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = torch.nn.Conv2d(3, 4, 1), torch.nn.Linear(4 * 4 * 4, 5)

    def forward(self, x):
        return self.fc(_doubled(self.conv(x)).flatten(1))


def test_auto_on_a_model_its_runtime_cannot_convert_says_so_instead_of_a_traceback():
    model = NoOnnx().eval()
    with pytest.raises(fxsurgery.SurgeryError, match="onnxruntime cannot run NoOnnx.*runtime='torch'"):
        fxsurgery.rewrite(model, torch.randn(2, 3, 4, 4), "auto")
