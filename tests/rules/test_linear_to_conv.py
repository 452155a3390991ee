"""Linear -> Conv2d: every flatten form, pooled heads, chains, and the sites that must be skipped."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations

import fxsurgery
from tests import reference
from tests.conftest import FLATTEN_FORMS, layout_ops, run_surgery

FLATTENS = FLATTEN_FORMS


class Head(nn.Module):
    def __init__(self, flatten, c=4, h=3, w=2, out=5, bias=True):
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3, padding=1)
        self.fc = nn.Linear(c * h * w, out, bias=bias)
        self.flatten = flatten

    def forward(self, x):
        return self.fc(self.flatten(self.conv(x)))


@pytest.mark.parametrize("form", sorted(FLATTENS))
def test_flatten_forms_become_hxw_conv(form):
    model = Head(FLATTENS[form]).eval()
    res = run_surgery("linear_to_conv", model, torch.randn(2, 3, 3, 2), rewritten=["fc"])
    conv = res.module.get_submodule("fc")
    assert isinstance(conv, nn.Conv2d) and conv.kernel_size == (3, 2) and conv.in_channels == 4
    assert res.sites[0].pattern == "flatten->linear"


def test_nn_flatten_and_squeeze_chain():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.flat = nn.Flatten()
            self.a = nn.Linear(8, 3)
            self.b = nn.Linear(8, 3)

        def forward(self, x):
            p = self.pool(x)
            return self.a(self.flat(p)) + self.b(p.squeeze(-1).squeeze(-1))

    run_surgery("linear_to_conv", M().eval(), torch.randn(2, 8, 5, 5), rewritten=["a", "b"])


def test_weight_is_a_view_with_the_same_name_and_numpy_reference():
    """The conv kernel is W.view(O, C, H, W) of the original storage; its output matches NumPy's conv."""
    model = Head(FLATTENS["torch.flatten"], c=4, h=3, w=2).eval().double()
    x = torch.randn(2, 3, 3, 2, dtype=torch.float64)
    res = fxsurgery.linear_to_conv(model, x)
    conv = res.module.get_submodule("fc")
    assert conv.weight.data_ptr() == model.fc.weight.data_ptr()  # a view: no copy
    assert conv.bias.data_ptr() == model.fc.bias.data_ptr()
    assert "fc.weight" in res.module.state_dict() and res.module.state_dict()["fc.weight"].shape == (5, 4, 3, 2)
    feat = model.conv(x).detach().numpy()
    expected = reference.conv2d(feat, model.fc.weight.detach().numpy().reshape(5, 4, 3, 2), model.fc.bias.detach().numpy())
    with torch.no_grad():
        np.testing.assert_allclose(res.module(x).numpy(), expected.reshape(2, 5), rtol=0, atol=1e-12)


@pytest.mark.parametrize("batch_layout, conversions", [("spatial", 4), ("batch", 1)])
def test_vgg_classifier_chain_is_conv_only(batch_layout, conversions):
    class VGGish(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(7))
            self.classifier = nn.Sequential(
                nn.Linear(8 * 49, 32), nn.ReLU(True), nn.Dropout(), nn.Linear(32, 32), nn.GELU(), nn.Dropout(),
                nn.Linear(32, 10),
            )  # fmt: skip

        def forward(self, x):
            return self.classifier(torch.flatten(self.features(x), 1))

    res = run_surgery("linear_to_conv", VGGish().eval(), torch.randn(2, 3, 14, 14), batch_layout=batch_layout,
                      rewritten=["classifier.0", "classifier.3", "classifier.6"])  # fmt: skip
    # spatial: permute + reshape in (the batch side by side), flatten + t out; batch: one flatten at the end.
    # Either way no reshape ping-pong between the sites.
    assert layout_ops(res.module) == conversions, res.module.code
    convs = [m for m in res.module.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 4 and not any(isinstance(m, nn.Linear) for m in res.module.modules())
    assert [s.pattern for s in res.sites] == ["flatten->linear", "chain-linear", "chain-linear"]


def test_mobilenet_v3_style_head_pooled_chain():
    class MBHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 16, 3)
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.classifier = nn.Sequential(nn.Linear(16, 32), nn.Hardswish(), nn.Dropout(0.2), nn.Linear(32, 7))

        def forward(self, x):
            x = self.avgpool(self.conv(x))
            return self.classifier(torch.flatten(x, 1))

    run_surgery("linear_to_conv", MBHead().eval(), torch.randn(3, 3, 9, 9),
                rewritten=["classifier.0", "classifier.3"])  # fmt: skip


def test_mean_pooled_head_keeps_dims():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 4)

        def forward(self, x):
            return F.silu(self.fc(x.mean([2, 3])))

    res = run_surgery("linear_to_conv", M().eval(), torch.randn(2, 6, 5, 4), rewritten=["fc"])
    assert res.sites[0].pattern == "pool->linear"
    means = [n for n in res.module.graph.nodes if n.target == "mean"]
    assert means and all(n.kwargs.get("keepdim") for n in means)


def test_functional_linear_and_bias_false():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(5, 12))
            self.fc = nn.Linear(12, 3, bias=False)

        def forward(self, x):
            f = torch.flatten(x, 1)
            return F.linear(f, self.w), self.fc(f)

    res = run_surgery("linear_to_conv", M().eval(), torch.randn(2, 3, 2, 2), rewritten=["linear", "fc"])
    assert res.module.w.shape == (5, 12)  # functional weight keeps its 2-D shape; the graph views it
    assert res.module.fc.bias is None


def test_permuted_nhwc_flatten_permutes_the_kernel():
    """Flatten of x.permute(0, 2, 3, 1): a naive reshape of the weight would be wrong; the kernel is permuted."""

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4 * 3 * 2, 5)

        def forward(self, x):
            return self.fc(x.permute(0, 2, 3, 1).flatten(1))

    model = M().eval()
    res = run_surgery("linear_to_conv", model, torch.randn(2, 4, 3, 2), rewritten=["fc"])
    conv = res.module.get_submodule("fc")
    assert conv.weight.shape == (5, 4, 3, 2) and conv.weight.data_ptr() == model.fc.weight.data_ptr()
    naive = nn.Conv2d(4, 5, (3, 2)).eval()
    with torch.no_grad():
        naive.weight.copy_(model.fc.weight.view(5, 4, 3, 2))
        naive.bias.copy_(model.fc.bias)
        x = torch.randn(2, 4, 3, 2)
        assert (naive(x).flatten(1) - model(x)).abs().max() > 1e-2  # the naive mapping really is wrong


def test_flatten_with_other_users_keeps_serving_them():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 2)

        def forward(self, x):
            f = torch.flatten(x, 1)
            return self.fc(f), f * 2

    res = run_surgery("linear_to_conv", M().eval(), torch.randn(3, 2, 2, 2), rewritten=["fc"])
    assert any(n.target is torch.flatten for n in res.module.graph.nodes)


def test_bigger_image_is_rejected_like_the_original():
    model = Head(FLATTENS["torch.flatten"]).eval()
    res = fxsurgery.linear_to_conv(model, torch.randn(2, 3, 3, 2))
    big = torch.randn(2, 3, 6, 4)
    with pytest.raises(RuntimeError):
        model(big)
    with pytest.raises(RuntimeError, match="rewritten for a 3x2 feature map"):
        res.module(big)


# ---- negative cases: skipped with the reason ------------------------------------------------------------------


class TwoCalls(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x, tokens):
        return self.fc(torch.flatten(x, 1)), self.fc(tokens)


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(8, 8)
        self.head = nn.Linear(8, 8)
        self.head.weight = self.embed.weight

    def forward(self, x):
        f = torch.flatten(x, 1)
        return self.head(f) + self.embed(f)


class QATish(nn.Linear):
    def forward(self, x):
        return super().forward(torch.round(x * 8) / 8)


def _hooked():
    m = Head(FLATTENS["torch.flatten"])
    m.fc.register_forward_hook(lambda mod, i, o: o * 2)
    return m


def _pre_hooked():
    m = Head(FLATTENS["torch.flatten"])
    m.fc.register_forward_pre_hook(lambda mod, i: (i[0] * 0.5,))
    return m


def _subclass():
    m = Head(FLATTENS["torch.flatten"])
    m.fc = torch.ao.nn.qat.Linear(24, 5, qconfig=torch.ao.quantization.get_default_qat_qconfig())
    return m


def _parametrized():
    m = Head(FLATTENS["torch.flatten"])
    parametrizations.weight_norm(m.fc)
    return m


@pytest.mark.parametrize(
    "make, inputs, skipped",
    [
        (TwoCalls, (torch.randn(2, 2, 2, 2), torch.randn(2, 8)), {"fc": "called 2 times"}),
        (Tied, (torch.randn(2, 2, 2, 2),), {"embed": "shared with head", "head": "shared with embed"}),
        (_hooked, (torch.randn(2, 3, 3, 2),), {"fc": "forward hooks"}),
        (_pre_hooked, (torch.randn(2, 3, 3, 2),), {"fc": "forward pre-hooks"}),
        (_subclass, (torch.randn(2, 3, 3, 2),), {"fc": "Linear is a subclass of Linear whose forward may differ"}),
        (_parametrized, (torch.randn(2, 3, 3, 2),), {"fc": "parametrized (weight"}),
    ],
    ids=["shared-call", "tied", "hook", "pre-hook", "subclass", "parametrized"],
)
def test_unsafe_linears_are_skipped_with_reason(make, inputs, skipped):
    run_surgery("linear_to_conv", make().eval(), inputs, rewritten=[], skipped=skipped, precision="native")


def test_token_and_plain_inputs_are_skipped():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok = nn.Linear(8, 8)
            self.vec = nn.Linear(8, 8)
            self.hard = nn.Linear(8, 8)

        def forward(self, tokens, vec, img):
            return self.tok(tokens).sum() + self.vec(vec).sum() + self.hard(img.view(1, -1)).sum()

    inputs = (torch.randn(1, 5, 8), torch.randn(1, 8), torch.randn(1, 2, 2, 2))
    run_surgery("linear_to_conv", M().eval(), inputs, rewritten=[],
                skipped={"tok": "(B, S, C) tokens", "vec": "not a flattened or pooled", "hard": "hard-codes the batch"})  # fmt: skip


def test_squeeze_without_dims_is_skipped():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 2)

        def forward(self, x):
            return self.fc(x.squeeze())

    run_surgery("linear_to_conv", M().eval(), torch.randn(2, 8, 1, 1), rewritten=[],
                skipped={"fc": "squeeze() without dims"})  # fmt: skip


def test_exclude_leaves_a_site_alone():
    model = Head(FLATTENS["torch.flatten"]).eval()
    run_surgery("linear_to_conv", model, torch.randn(2, 3, 3, 2), rewritten=[], skipped={"fc": "excluded"},
                exclude=["fc"])  # fmt: skip


def test_batchnorm1d_after_linear_stays_2d():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 6)
            self.bn = nn.BatchNorm1d(6)
            self.out = nn.Linear(6, 2)

        def forward(self, x):
            return self.out(torch.relu(self.bn(self.fc(torch.flatten(x, 1)))))

    model = M().eval()
    model.bn.running_mean.uniform_(-1, 1)
    run_surgery("linear_to_conv", model, torch.randn(4, 2, 2, 2), rewritten=["fc"],
                skipped={"out": "not a flattened or pooled"})  # fmt: skip


def test_traced_through_subclass_keeps_its_fake_quant():
    """A user subclass is traced through: its rounding stays in the graph and blocks the rewrite of its F.linear."""
    m = Head(FLATTENS["torch.flatten"])
    m.fc = QATish(24, 5)
    res = run_surgery("linear_to_conv", m.eval(), torch.randn(2, 3, 3, 2), rewritten=[],
                      skipped={"linear": "not a flattened or pooled",
                               "fc": "QATish is a Linear subclass whose forward does not compute"})  # fmt: skip
    assert any(n.target is torch.round for n in res.module.graph.nodes)


def test_bad_batch_layout():
    with pytest.raises(fxsurgery.InputError, match="batch_layout must be"):
        fxsurgery.linear_to_conv(Head(FLATTENS["torch.flatten"]), torch.randn(1, 3, 3, 2), batch_layout="nope")


@pytest.mark.parametrize("batch_layout", ["spatial", "batch"])
def test_both_batch_layouts_exact_at_other_batch_sizes(batch_layout):
    model = Head(FLATTENS["torch.flatten"]).eval()
    res = run_surgery("linear_to_conv", model, torch.randn(3, 3, 3, 2), rewritten=["fc"], batch_layout=batch_layout)
    for n in (1, 5):
        x = torch.randn(n, 3, 3, 2)
        with torch.no_grad():
            torch.testing.assert_close(res.module(x), model(x), rtol=1e-5, atol=1e-6)


def test_channels_last_chain_reports_the_nchw_map():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 8)
            self.b = nn.Linear(8, 4)

        def forward(self, x):
            return self.b(torch.relu(self.a(x.permute(0, 2, 3, 1)))).permute(0, 3, 1, 2)

    res = run_surgery("linear_to_conv", Block().eval(), torch.randn(2, 4, 5, 3), rewritten=["a", "b"])
    assert [s.input_shape for s in res.sites] == [(2, 4, 5, 3), (2, 8, 5, 3)]
    assert [s.pattern for s in res.sites] == ["channels-last-linear", "chain-linear"]
    assert layout_ops(res.module) == 0, res.module.code  # both permutes cancelled


def test_linear_on_a_constant_is_skipped_with_its_reason():
    class ConstantBias(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("table", torch.randn(2, 4))
            self.bias_mlp = nn.Linear(4, 3)
            self.fc = nn.Linear(12, 3)

        def forward(self, x):
            return self.fc(torch.flatten(x, 1)) + self.bias_mlp(self.table).sum(0)

    run_surgery("linear_to_conv", ConstantBias().eval(), torch.randn(2, 3, 2, 2), rewritten=["fc"],
                skipped={"bias_mlp": "its input is a constant"})  # fmt: skip
