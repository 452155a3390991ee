"""The rewriter with a toy rule, so that these tests see the engine alone: what becomes a site, what is skipped and
why, conversions built once."""

from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn

from fxsurgery.capture import propagate_shapes, trace
from fxsurgery.engine.rewriter import CONSTANT_INPUT, Rewriter
from fxsurgery.engine.rule import Match, RuleSet, Skip
from fxsurgery.report import Site
from fxsurgery.rules.linear_to_conv.layouts import TOKEN_LAYOUT


class Negate(nn.Module):
    def forward(self, x):
        return -x


class NegateRule:
    """Replaces a ``Negate`` call by ``torch.neg``; skips a module named ``skip``, and has a bug on ``boom``."""

    pattern = "negate"

    def claims(self, node, rw):
        return str(node.target) if node.op == "call_module" and isinstance(rw.modules[node.target], Negate) else None

    def match(self, node, rw):
        if node.target == "skip":
            return Skip("told to")
        if node.target == "boom":
            raise RuntimeError("a bug in the rule")
        return Match(node, str(node.target))

    def apply(self, m, rw):
        with rw.graph.inserting_before(m.node):
            new = rw.graph.call_function(torch.neg, (m.node.args[0],))
        m.node.replace_all_uses_with(new)
        rw.graph.erase_node(m.node)
        return Site(m.name, self.pattern, "rewritten", before="Negate", after="torch.neg")


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.skip, self.boom, self.twice, self.const = Negate(), Negate(), Negate(), Negate(), Negate()
        self.p = nn.Parameter(torch.randn(3))

    def forward(self, x):
        y = self.a(x) + self.skip(x) + self.boom(x)
        return self.twice(self.twice(y)) + self.const(self.p)


def _run(exclude=()):
    gm = trace(Model(), leaf_modules=(Negate,))
    propagate_shapes(gm, (torch.randn(2, 3),))
    rw = Rewriter(gm, RuleSet("test", (NegateRule(),)), exclude)
    return gm, rw, rw.run()


def test_every_claimed_node_is_a_site_with_its_outcome():
    gm, _, sites = _run()
    by_name = {s.name: s for s in sites}
    assert list(by_name) == ["a", "skip", "boom", "twice", "const"]  # "twice" once, though called twice
    assert by_name["a"].rewritten
    assert by_name["skip"].reason == "told to"
    assert by_name["boom"].reason == "internal error while matching (RuntimeError: a bug in the rule); please report it"
    assert by_name["twice"].reason == "called 2 times in forward (a shared layer); left as it is"
    assert by_name["const"].reason == CONSTANT_INPUT  # its input is a parameter: no model input reaches it
    calls = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert calls == ["skip", "boom", "twice", "twice", "const"]  # rewritten sites left the graph; skipped ones are untouched


def test_rewritten_graph_computes_the_same():
    torch.manual_seed(0)
    model = Model()
    gm, _, _ = _run()
    gm.load_state_dict(model.state_dict())
    x = torch.randn(2, 3)
    assert torch.equal(gm(x), model(x))


def test_excluded_sites_are_listed_as_such():
    _, _, sites = _run(exclude=["a"])
    assert {s.name: s.reason for s in sites}["a"] == "excluded by the caller"


def test_conversions_are_built_once_per_value():
    class Tokens(nn.Module):
        def forward(self, x):
            return x.relu()

    gm = fx.symbolic_trace(Tokens())
    propagate_shapes(gm, (torch.randn(2, 5, 4),))
    rw = Rewriter(gm, RuleSet("test", ()))
    x = next(n for n in gm.graph.nodes if n.op == "placeholder")
    first = rw.enter(x, TOKEN_LAYOUT, "s")
    assert rw.enter(x, TOKEN_LAYOUT, "s") is first
    relu = next(n for n in gm.graph.nodes if n.target == "relu")
    rw.set_alt(relu, first, TOKEN_LAYOUT)
    assert rw.exit_of(relu) is rw.exit_of(relu)
    assert rw.exit_of(x) is x  # not carried: itself
