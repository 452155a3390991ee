"""The rewriter with a toy rule, so that these tests see the engine alone: what becomes a site, what is skipped and
why, conversions built once."""

from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn

from fxsurgery.capture import propagate_shapes, trace
from fxsurgery.engine.rewriter import CONSTANT_INPUT, Rewriter, rewrite_alike
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

    after = "torch.neg"

    def emit(self, m, rw):
        """The node computing the call ``m`` anew (inserted before it)."""
        return rw.graph.call_function(torch.neg, (m.node.args[0],))

    def apply(self, m, rw):
        with rw.graph.inserting_before(m.node):
            new = self.emit(m, rw)
        m.node.replace_all_uses_with(new)
        rw.graph.erase_node(m.node)
        return Site(m.name, self.pattern, "rewritten", before="Negate", after=self.after)


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
    assert by_name["twice"].rewritten and by_name["twice"].after == "torch.neg (the same at each of its 2 calls)"
    assert by_name["const"].reason == CONSTANT_INPUT  # its input is a parameter: no model input reaches it
    calls = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert calls == ["skip", "boom", "const"]  # rewritten sites left the graph (both calls of "twice"); skipped ones stay


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


class Scaled(nn.Module):
    """What ``ScaleRule`` installs in place of a ``Negate``: ``-k * x`` (``k = 1``: the same function)."""

    def __init__(self, k: float) -> None:
        super().__init__()
        self.k = k

    def forward(self, x):
        return -self.k * x

    def extra_repr(self) -> str:
        return f"k={self.k}"


class ScaleRule(NegateRule):
    """Replaces a ``Negate`` by a ``Scaled`` module of the same name, one call at a time: skips a call on a graph
    input; with ``k_of`` a function of the call's input, installs a ``Scaled(k)`` that differs per call."""

    def __init__(self, k_of=lambda x: 1.0):
        self.k_of = k_of

    def match(self, node, rw):
        if node.args[0].op == "placeholder":
            return Skip("its input is a graph input")
        return Match(node, str(node.target))

    after = "Scaled"

    def emit(self, m, rw):
        rw.new_modules[m.name] = Scaled(self.k_of(m.node.args[0]))
        return rw.graph.call_module(m.name, m.node.args)


class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.n = Negate()

    def forward(self, x, y):
        return self.n(self.n(x.relu())) + self.n(y * 2)  # three calls of one module


def _shared_pass(rule, inputs):
    def fresh():
        gm = trace(Shared(), leaf_modules=(Negate,))
        propagate_shapes(gm, inputs)
        return gm

    rw = rewrite_alike(fresh, RuleSet("test", (rule,)))
    return rw, {s.name: s for s in rw.sites}


def test_a_shared_module_is_replaced_at_every_call_by_one_layer():
    inputs = (torch.randn(2, 3), torch.randn(2, 3))
    rw, sites = _shared_pass(ScaleRule(), inputs)
    assert sites["n"].rewritten and sites["n"].after == "Scaled (the same at each of its 3 calls)"
    assert [type(rw.gm.get_submodule(n.target)) for n in rw.gm.graph.nodes if n.op == "call_module"] == [Scaled] * 3
    x, y = inputs
    torch.testing.assert_close(rw.gm(x, y), x.relu() - 2 * y, rtol=0, atol=0)


def test_a_shared_module_whose_calls_differ_is_held_and_the_pass_redone():
    x = torch.randn(2, 3)

    class OnInput(Shared):
        def forward(self, x, y):
            return self.n(x) + self.n(y.relu())  # the first call reads a graph input: the rule skips it

    def fresh():
        gm = trace(OnInput(), leaf_modules=(Negate,))
        propagate_shapes(gm, (x, x))
        return gm

    rw = rewrite_alike(fresh, RuleSet("test", (ScaleRule(),)))
    (site,) = rw.sites
    assert site.reason == (
        "called 2 times in forward (a shared layer), and not every call can be rewritten alike (one of them cannot "
        "be: its input is a graph input); left as it is"
    )
    assert [type(rw.gm.get_submodule(n.target)) for n in rw.gm.graph.nodes if n.op == "call_module"] == [Negate] * 2
    torch.testing.assert_close(rw.gm(x, x), -x - x.relu(), rtol=0, atol=0)

    differing = iter([1.0, 2.0, 3.0])  # a different layer at each call
    rw, sites = _shared_pass(ScaleRule(lambda _: next(differing)), (torch.randn(2, 3), torch.randn(2, 3)))
    assert sites["n"].reason.endswith("(they would need different layers); left as it is")
    assert not rw.new_modules
