"""ConvNeXt-style blocks: permute -> LayerNorm(C) -> Linear -> GELU -> Linear -> permute become NCHW 1x1 convs with
a channel LayerNorm, and the layout changes cancel instead of being added."""

from __future__ import annotations

import torch
from torch import nn

import fxsurgery
from fxsurgery.onnx_check import op_histogram
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
