"""Shape propagation (``fxsurgery.capture.propagate_shapes``): on the meta device first, fake tensors and then one
real run where the meta run fails. The shapes are checked against a real run of the model (torch's ShapeProp)."""

from __future__ import annotations

import copy
import logging

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

import fxsurgery
from fxsurgery.capture import propagate_shapes


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 4 * 4, 5)
        self.head = nn.Linear(5, 5)

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x))) + torch.ones(8, 1, 1)  # a tensor made in forward
        return self.head(self.fc(h.flatten(1)))


def _real_shapes(gm, x):
    gm = copy.deepcopy(gm)
    ShapeProp(gm).propagate(x)
    return {n.name: tuple(n.meta["tensor_meta"].shape) for n in gm.graph.nodes if "tensor_meta" in n.meta}


def test_shapes_come_from_the_meta_device_match_a_real_run_and_move_no_statistic(caplog):
    model, x = Net().train(), torch.randn(2, 3, 4, 4)
    gm = fx.symbolic_trace(model)
    real = _real_shapes(gm, x)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with caplog.at_level(logging.INFO, logger="fxsurgery"):
        propagate_shapes(gm, (x,))
    assert "shape propagation failed" not in caplog.text  # the meta run sufficed
    vals = {n.name: n.meta["val"] for n in gm.graph.nodes if isinstance(n.meta.get("val"), torch.Tensor)}
    assert all(v.device.type == "meta" for v in vals.values())
    assert {k: tuple(v.shape) for k, v in vals.items()} == real
    for k, v in model.state_dict().items():  # BatchNorm ran in train mode, on meta copies only
        assert torch.equal(v, before[k]) and v.device.type == "cpu", k


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        h = self.conv(x)
        scale = h[h > 0].numel() * 0 + 1  # a size known only from the values
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(h, 1), 1)) * scale


def test_a_model_the_meta_run_cannot_run_falls_back_and_is_rewritten(caplog):
    model, x = DataDependent().eval(), torch.randn(2, 3, 5, 5)
    with caplog.at_level(logging.INFO, logger="fxsurgery"):
        res = fxsurgery.linear_to_conv(model, x)
    assert "meta-device shape propagation failed" in caplog.text
    assert [s.name for s in res.rewritten] == ["fc"] and res.validation.passed
