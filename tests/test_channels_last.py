"""ConvNeXt-style blocks: permute -> LayerNorm(C) -> Linear -> GELU -> Linear -> permute become NCHW 1x1 convs with
a channel LayerNorm, and the layout changes cancel instead of being added."""

from __future__ import annotations

import torch
from torch import nn

import fxsurgery
from fxsurgery.artifacts.onnx_export import op_histogram
from tests.conftest import layout_ops, run_surgery


class Permute(nn.Module):
    def __init__(self, dims):
        super().__init__()
        self.dims = dims

    def forward(self, x):
        return torch.permute(x, self.dims)


class ConvNeXtBlock(nn.Module):
    def __init__(self, dim=8):
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(dim, dim, 7, padding=3, groups=dim), Permute([0, 2, 3, 1]), nn.LayerNorm(dim, eps=1e-6),
            nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim), Permute([0, 3, 1, 2]),
        )  # fmt: skip
        self.layer_scale = nn.Parameter(torch.rand(dim, 1, 1))

    def forward(self, x):
        return x + self.layer_scale * self.block(x)


def test_convnext_blocks_become_nchw_convs(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(ConvNeXtBlock(), ConvNeXtBlock()).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):  # non-trivial affine parameters
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    x = torch.randn(2, 8, 6, 5)
    res = run_surgery("linear_to_conv", model, x, rewritten=["0.block.3", "0.block.5", "1.block.3", "1.block.5"])
    assert [s.pattern for s in res.sites] == ["chain-linear"] * 4  # each chain starts at the LayerNorm, carried NCHW
    assert layout_ops(res.module) == 0, res.module.code  # every permute cancelled
    calls = [n for n in res.module.graph.nodes if n.op == "call_function" and "layer_norm_channels" in str(n.target)]
    assert len(calls) == 2
    report = fxsurgery.check(model, x, "conv", tmp_path)
    assert report.passed, report.summary()
    assert report.onnx.op_counts["original"].get("Transpose", 0) == 4
    assert report.onnx.op_counts["rewritten"].get("Transpose", 0) == 0
    assert op_histogram(report.onnx.rewritten_path).get("MatMul", 0) + op_histogram(
        report.onnx.rewritten_path
    ).get("Gemm", 0) == 0


def test_permute_without_a_linear_is_left_alone():
    class M(nn.Module):
        def forward(self, x):
            return torch.permute(x, (0, 2, 3, 1)) * 2

    model = M().eval()
    res = run_surgery("linear_to_conv", model, torch.randn(1, 3, 2, 2), rewritten=[])
    assert [n.op for n in res.module.graph.nodes] == ["placeholder", "call_function", "call_function", "output"]


class PointwiseBNBlock(nn.Module):
    """Pointwise convs with BatchNorm between them and a residual add: the conv -> Linear direction."""

    def __init__(self, c=8):
        super().__init__()
        self.c1, self.bn1 = nn.Conv2d(c, 2 * c, 1), nn.BatchNorm2d(2 * c)
        self.c2, self.bn2 = nn.Conv2d(2 * c, c, 1), nn.BatchNorm2d(c)
        for bn in (self.bn1, self.bn2):
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
            nn.init.normal_(bn.weight)
            nn.init.normal_(bn.bias)

    def forward(self, x):
        return torch.relu(self.bn2(self.c2(torch.relu(self.bn1(self.c1(x))))) + x)


def test_batchnorm_between_pointwise_convs_stays_channels_last():
    from fxsurgery.engine.layers import ChannelsLastBatchNorm2d

    model = nn.Sequential(PointwiseBNBlock(), PointwiseBNBlock()).eval()
    res = run_surgery("conv_to_linear", model, torch.randn(2, 8, 5, 5), rewritten=["0.c1", "0.c2", "1.c1", "1.c2"])
    gm = res.module
    permutes = [n for n in gm.graph.nodes if n.op == "call_method" and n.target == "permute"]
    assert len(permutes) == 2, gm.code  # one in, one out: BatchNorm, ReLU and the residual add run channels-last
    carried = {name for name, m in gm.named_modules() if isinstance(m, ChannelsLastBatchNorm2d)}
    assert carried == {"0.bn1", "0.bn2", "1.bn1", "1.bn2"}  # each feeds a pointwise conv or the carried residual
    assert gm.get_submodule("0.bn1").weight.data_ptr() == model[0].bn1.weight.data_ptr()  # a view; buffers its own
    assert gm.state_dict().keys() == model.state_dict().keys()
    # training mode: the same outputs and the same running-statistics updates as the original
    a = nn.Sequential(PointwiseBNBlock(), PointwiseBNBlock())
    a.load_state_dict(model.state_dict())
    b = fxsurgery.conv_to_linear(a, torch.randn(2, 8, 5, 5), validate=False).module
    a.train()
    b.train()
    x = torch.randn(4, 8, 5, 5)
    torch.testing.assert_close(b(x), a(x))
    for name in ("0.bn1", "0.bn2", "1.bn1", "1.bn2"):
        for buf in ("running_mean", "running_var", "num_batches_tracked"):
            torch.testing.assert_close(b.get_buffer(f"{name}.{buf}"), a.get_buffer(f"{name}.{buf}"))
    assert int(a[0].bn1.num_batches_tracked) == 1


def test_conv_to_linear_bn_stack_onnx_has_two_transposes(tmp_path):
    model = nn.Sequential(PointwiseBNBlock(), PointwiseBNBlock()).eval()
    x = torch.randn(2, 8, 5, 5)
    res = fxsurgery.conv_to_linear(model, x)
    check = fxsurgery.cross_check(model, res.module, x, tmp_path, direction=res.direction,
                                  rewritten_sites=len(res.rewritten))  # fmt: skip
    assert check, check.summary()
    assert check.op_counts["rewritten"].get("Transpose", 0) == 2
    assert "BatchNormalization" not in check.op_counts["rewritten"]


class BNBeforeSpatialConv(nn.Module):
    """conv1x1 -> BN -> ReLU -> 3x3 conv: the 3x3 conv needs NCHW, so the BatchNorm stays NCHW."""

    def __init__(self, c=8):
        super().__init__()
        self.c1, self.bn = nn.Conv2d(c, c, 1), nn.BatchNorm2d(c)
        self.c3 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.c3(torch.relu(self.bn(self.c1(x))))


def test_batchnorm_before_a_spatial_conv_stays_nchw():
    model = BNBeforeSpatialConv().eval()
    res = run_surgery("conv_to_linear", model, torch.randn(2, 8, 5, 5), rewritten=["c1"])
    assert type(res.module.bn) is nn.BatchNorm2d
