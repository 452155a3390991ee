"""The steps that end a pass: permute cancelling, unused reads, conversion back, dead-code removal that keeps
in-place ops."""

from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn

from fxsurgery.capture import propagate_shapes
from fxsurgery.engine import cleanup
from fxsurgery.engine.rewriter import Rewriter
from fxsurgery.engine.rule import RuleSet
from fxsurgery.rules.linear_to_conv.layouts import NCHW_LAYOUT, TOKEN_LAYOUT


def _rewriter(module, *inputs):
    gm = fx.symbolic_trace(module)
    propagate_shapes(gm, inputs)
    return gm, Rewriter(gm, RuleSet("test", ()))


def _node(gm, target):
    return next(n for n in gm.graph.nodes if n.target == target)


class PermuteBack(nn.Module):
    def forward(self, x):
        y = x.permute(0, 2, 3, 1)
        return y.permute(0, 3, 1, 2) + 1


def test_a_permute_back_to_the_carried_layout_cancels():
    x = torch.randn(2, 3, 4, 5)
    gm, rw = _rewriter(PermuteBack(), x)
    y = next(n for n in gm.graph.nodes if n.target == "permute")
    rw.seed(y, y.args[0], NCHW_LAYOUT)  # y = x.permute(0, 2, 3, 1) is x in NCHW
    cleanup.finish(rw)
    assert not any(n.target == "permute" for n in gm.graph.nodes), gm.code
    assert torch.equal(gm(x), x + 1)


class Reads(nn.Module):
    def forward(self, x):
        return x.relu(), x.sum()


def test_unused_reads_are_dropped_and_outside_users_share_one_conversion():
    x = torch.randn(2, 5, 4)
    gm, rw = _rewriter(Reads(), x)
    placeholder = next(n for n in gm.graph.nodes if n.op == "placeholder")
    with gm.graph.inserting_after(placeholder):  # x.shape read and never used (ViT reads it for an assert message)
        gm.graph.call_function(getattr, (placeholder, "shape"))
    relu = _node(gm, "relu")
    with gm.graph.inserting_before(relu):
        carried = rw.enter(placeholder, TOKEN_LAYOUT, "s")
        alt = gm.graph.call_method("relu", (carried,))
    rw.set_alt(relu, alt, TOKEN_LAYOUT)
    getattr_nodes_before = [n for n in gm.graph.nodes if n.target is getattr]
    cleanup.finish(rw)
    assert getattr_nodes_before and not [n for n in gm.graph.nodes if n.target is getattr]
    transposes = [n for n in gm.graph.nodes if n.target == "transpose"]
    assert len(transposes) == 2  # one in (x -> (B, C, 1, S)), one back for the output; x.sum() reads x itself
    got = gm(x)
    assert torch.equal(got[0], x.relu()) and torch.equal(got[1], x.sum())


class InPlace(nn.Module):
    def forward(self, x):
        a = x.relu()
        b = x.mul_(2)  # result unused, but it changes x
        c = x.sin()  # unused and pure
        del b, c
        return a + x


def test_dead_code_removal_keeps_in_place_ops():
    gm, _ = _rewriter(InPlace(), torch.randn(3))
    unused = [n for n in gm.graph.nodes if n.op != "output" and not n.users]
    assert {n.target for n in unused} == {"mul_", "sin"}
    cleanup.remove_dead(gm.graph, dict(gm.named_modules()), unused)
    gm.recompile()
    targets = {n.target for n in gm.graph.nodes}
    assert "mul_" in targets and "sin" not in targets
    x = torch.randn(3)
    expected = x.relu() + 2 * x
    assert torch.equal(gm(x.clone()), expected)


def test_erasable():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.drop, self.bn = nn.Dropout(), nn.BatchNorm1d(3)

        def forward(self, x):
            x += 1
            return self.drop(x), self.bn(x)

    gm, _ = _rewriter(M().eval(), torch.randn(2, 3))
    modules = dict(gm.named_modules())
    verdict = {str(n.target): cleanup.erasable(n, modules) for n in gm.graph.nodes if n.op != "output"}
    assert verdict["drop"] is True  # elementwise module: pure
    assert verdict["bn"] is False  # a module with state (running statistics in training)
    assert verdict["x"] is False  # a graph input
    assert not any(v for k, v in verdict.items() if "iadd" in k)
