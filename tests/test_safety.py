"""The user's model and inputs are never changed; dtype, device flags and names are kept; failures are clear."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import fxsurgery
from fxsurgery.engine.weights import shares_storage
from fxsurgery.models import NetworkInNetwork, demo_model
from tests.conftest import assert_unchanged, run_surgery, snapshot


@pytest.mark.parametrize("direction", ["linear_to_conv", "conv_to_linear"])
def test_train_mode_model_is_untouched(direction):
    model = demo_model().train()
    before = snapshot(model)
    res = fxsurgery.rewrite(model, torch.randn(2, 3, 32, 32), direction)
    assert_unchanged(model, before)  # BatchNorm statistics did not move; training flags kept
    assert res.module.training and res.module.bn.training
    res.module.eval()
    assert model.training and model.bn.training  # the rewritten copy has its own module objects


def test_weights_are_views_not_copies():
    model = demo_model()
    res = fxsurgery.linear_to_conv(model, torch.randn(2, 3, 32, 32))
    orig = dict(model.named_parameters())
    for name, p in res.module.named_parameters():
        assert shares_storage(p, orig[name]), name
    assert set(dict(res.module.named_parameters())) == set(orig)  # names unchanged


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_dtypes_preserved(dtype):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 5)).to(dtype).eval()
    x = torch.randn(2, 3, 6, 6, dtype=dtype)
    res = fxsurgery.linear_to_conv(model, x)
    assert res.validation.passed and res.validation.rtol == fxsurgery.RTOL[dtype]
    assert res.module(x).dtype == dtype and res.module.get_submodule("2").weight.dtype == dtype


def test_requires_grad_preserved_and_gradients_flow():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 5))
    model[0].requires_grad_(False)
    res = fxsurgery.linear_to_conv(model, torch.randn(2, 3, 6, 6))
    assert not res.module.get_submodule("0").weight.requires_grad
    assert res.module.get_submodule("2").weight.requires_grad
    res.module(torch.randn(2, 3, 6, 6)).sum().backward()
    assert res.module.get_submodule("2").weight.grad.shape == (5, 4, 4, 4)


def test_inplace_input_modification_does_not_reach_the_caller():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(12, 2)

        def forward(self, x):
            x.mul_(2)
            return self.fc(torch.flatten(x, 1))

    run_surgery("linear_to_conv", M().eval(), torch.randn(2, 3, 2, 2), rewritten=["fc"])


def test_channels_last_input():
    model = NetworkInNetwork(8).eval()
    x = torch.randn(2, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    run_surgery("conv_to_linear", model, x, rewritten=["pointwise1", "pointwise2"])


def test_data_parallel_is_unwrapped():
    model = NetworkInNetwork(8).eval()
    res = fxsurgery.conv_to_linear(nn.DataParallel(model), torch.randn(1, 3, 8, 8))
    assert len(res.rewritten) == 2


def test_graph_module_input_is_accepted():
    gm = torch.fx.symbolic_trace(NetworkInNetwork(8).eval())
    run_surgery("conv_to_linear", gm, torch.randn(1, 3, 8, 8), rewritten=["pointwise1", "pointwise2"])


def test_meta_device_model_rewrites_without_validation():
    with torch.device("meta"):
        model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 4, 1))
    with pytest.raises(fxsurgery.InputError, match="meta device"):
        fxsurgery.conv_to_linear(model, torch.randn(1, 3, 4, 4))
    res = fxsurgery.conv_to_linear(model, torch.randn(1, 3, 4, 4), validate=False)
    assert len(res.rewritten) == 2 and res.validation is None


def test_summary_and_to_dict_are_json():
    res = fxsurgery.linear_to_conv(demo_model(), torch.randn(2, 3, 32, 32))
    text = res.summary()
    assert "classifier.1" in text and "PASSED" in text
    data = json.loads(json.dumps(res.to_dict()))
    assert data["passed"] is True and len(data["sites"]) == len(res.sites)
    assert set(data["sites"][0]) == {"name", "pattern", "status", "reason", "before", "after", "input_shape", "direction",
                                    "calls", "subgraph"}


# ---- clear errors -----------------------------------------------------------------------------------------------


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = Branchy()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(torch.flatten(self.inner(x), 1))


class Branchy(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # control flow on tensor values
            return x
        return -x


def test_untraceable_submodule_becomes_a_leaf_and_leaf_modules_name_it():
    model = Untraceable().eval()
    x = torch.randn(2, 4, 1, 1)
    res = run_surgery("linear_to_conv", model, x, rewritten=["fc"])
    assert any("inner (Branchy) cannot be traced" in n for n in res.notes), res.notes
    assert any("inner left untouched" in n for n in res.notes)
    for leaf in (Branchy, "inner"):
        res = run_surgery("linear_to_conv", model, x, rewritten=["fc"], leaf_modules=[leaf])
        assert res.notes == ("front end: fx (torch.fx traced the whole model)",)


class UntraceableRoot(nn.Module):
    """The root's own forward branches on a value; its children trace."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 4, 1))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * 2 * 2, 3))

    def forward(self, x):
        y = self.features(x)
        if y.mean() > 10:
            y = y * 0
        return self.head(y)


@pytest.mark.parametrize("direction, rewritten", [("linear_to_conv", ["head.1"]),
                                                   ("conv_to_linear", ["features.0", "features.2"])])  # fmt: skip
def test_untraceable_root_is_rewritten_inside_its_children(direction, rewritten):
    model = UntraceableRoot().eval()
    res = run_surgery(direction, model, torch.randn(2, 3, 2, 2), rewritten=rewritten)
    assert type(res.module) is UntraceableRoot and res.module is not model
    assert any("forward of UntraceableRoot cannot be traced" in n for n in res.notes)
    assert isinstance(res.module.head if direction == "linear_to_conv" else res.module.features, torch.fx.GraphModule)
    # checkpoints still cross the rewrite with the full names
    ckpt = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
    fxsurgery.load_state_dict(res.module, ckpt)
    back = fxsurgery.original_state_dict(res.module)
    assert all(torch.equal(back[k], ckpt[k]) for k in ckpt)


def test_untraceable_model_without_children_is_a_trace_error():
    class Bare(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    with pytest.raises(fxsurgery.TraceError, match="cannot trace Bare.forward"):
        fxsurgery.linear_to_conv(Bare(), torch.randn(1, 3))


def test_root_hooks_are_refused():
    model = NetworkInNetwork(4)
    model.register_forward_hook(lambda m, i, o: o + 1)
    with pytest.raises(fxsurgery.TraceError, match="root module has forward hooks"):
        fxsurgery.conv_to_linear(model, torch.randn(1, 3, 4, 4))


def test_script_module_is_refused():
    with pytest.raises(fxsurgery.TraceError, match="ScriptModule"):
        fxsurgery.conv_to_linear(torch.jit.script(nn.Conv2d(3, 3, 1)), torch.randn(1, 3, 4, 4))


def test_lazy_module_is_refused():
    with pytest.raises(fxsurgery.InputError, match="lazy"):
        fxsurgery.linear_to_conv(nn.Sequential(nn.Flatten(), nn.LazyLinear(3)), torch.randn(1, 2, 2, 2))


@pytest.mark.parametrize(
    "inputs, match",
    [(None, "example_inputs must be"), ((), "non-empty"), ((torch.randn(1), 3), r"example_inputs\[1\] is a int")],
)
def test_bad_example_inputs(inputs, match):
    with pytest.raises(fxsurgery.InputError, match=match):
        fxsurgery.linear_to_conv(demo_model(), inputs)


def test_wrong_input_shape_is_a_clear_error():
    with pytest.raises(fxsurgery.SurgeryError, match="fails on the example inputs"):
        fxsurgery.linear_to_conv(demo_model(), torch.randn(2, 5, 32, 32))


def test_not_a_module():
    with pytest.raises(fxsurgery.InputError, match="must be a torch.nn.Module"):
        fxsurgery.conv_to_linear(lambda x: x, torch.randn(1))


def test_unknown_direction():
    with pytest.raises(fxsurgery.InputError, match="unknown direction"):
        fxsurgery.rewrite(demo_model(), torch.randn(2, 3, 32, 32), "sideways")
