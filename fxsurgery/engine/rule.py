"""What a rule is, and the checks every rule shares.

A :class:`Rule` owns one pattern (its ``pattern`` name is a constant of its module). The engine asks each rule of a
:class:`RuleSet`, in priority order, whether it ``claims`` a node (a cheap test of the op and the pattern: it
returns the site name); the first that does ``match``es it, returning a :class:`Match` with everything ``apply``
needs, or a :class:`Skip` whose message is the reason the site is left alone; ``apply`` rewrites the graph and
returns the :class:`~fxsurgery.report.Site`. A :class:`Propagator` carries a node that is not a candidate into a
layout (a LayerNorm over channels, a BatchNorm channels-last, an elementwise op), so consecutive sites share one
layout change.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.fx as fx
from torch import nn
from torch.nn.utils import parametrize

from fxsurgery.engine.elementwise import elementwise_tensor_inputs
from fxsurgery.engine.nodes import hook_kinds
from fxsurgery.report import Site

if TYPE_CHECKING:
    from fxsurgery.engine.layout import Layout

__all__ = [
    "Skip",
    "Match",
    "Rule",
    "Propagator",
    "RuleSet",
    "module_skip_reason",
    "weight_skip_reason",
    "feeds_candidate",
    "RuleContext",
    "TIMINGS",
    "timing_of",
    "owns_children",
]


class Skip(Exception):
    """A site left alone; the message is its reason. ``match`` returns one, helpers may raise one."""


@dataclass(frozen=True)
class Match:
    """A node a rule can rewrite: the site ``name`` and the ``node``; rules subclass it to carry their operands."""

    node: fx.Node
    name: str


class Rule(Protocol):
    """One rewrite pattern: ``claims`` -> ``match`` -> ``apply``."""

    pattern: str

    def claims(self, node: fx.Node, rw: RuleContext) -> str | None:
        """The site name when ``node`` is this rule's pattern, else None (the next rule is asked)."""
        ...

    def match(self, node: fx.Node, rw: RuleContext) -> Match | Skip:
        """Everything ``apply`` needs, or why the site must be left alone. Does not change the graph."""
        ...

    def apply(self, match: Any, rw: RuleContext) -> Site | tuple[Site, ...]:
        """Rewrite the matched site and return its record (several, when one match rewrites several layers)."""
        ...


#: How ``to="auto"`` measures the sites of a rule (its optional ``timing`` attribute): ``"alone"`` (the default: the
#: layer alone, on the value it reads), ``"block"`` (with the transformer block around it, original against rewritten,
#: and alone where the block cannot be run alone), ``"block-only"`` (its rewritten form spans several layers: within
#: its block or the whole model only).
TIMINGS = ("alone", "block", "block-only")


def timing_of(rule: object) -> str:
    return getattr(rule, "timing", "alone")


def owns_children(rule: object) -> bool:
    """Whether the sites named below a site of this rule (an attention's ``out_proj``) are rewritten with it or not
    at all (the rule's optional ``owns_children`` attribute)."""
    return bool(getattr(rule, "owns_children", False))


class RuleContext(Protocol):
    """What a rule or a propagator may read and do while the engine runs it (the rewriter is one): the graph and its
    modules, which values are computed from the inputs (``dynamic``), the layouts carried so far (``alt``,
    ``carried``), and the steps that change them; ``new_modules`` for a replacement layer, ``param_owners`` (who
    shares a parameter; ``param_readers``: which code reads it; ``module_calls``: how often each module is called),
    ``claims``: whether a rule of the set claims a node, and ``constant``/``add_constant``: a constant's value, a new
    one (a constant entered into a layout once, when the graph is rewritten). Nothing else of the pass."""

    graph: fx.Graph
    modules: dict[str, nn.Module]
    dynamic: set[fx.Node]
    alt: dict[fx.Node, tuple[fx.Node, Layout]]
    new_modules: dict[str, nn.Module]
    param_owners: dict[int, list[str]]
    param_readers: dict[int, list[tuple[str, fx.Node]]]
    module_calls: Counter[str]

    def set_alt(self, node: fx.Node, alt: fx.Node, layout: Layout) -> None: ...

    def seed(self, node: fx.Node, alt: fx.Node, layout: Layout) -> None: ...

    def enter(self, node: fx.Node, layout: Layout, site: str) -> fx.Node: ...

    def exit_of(self, node: fx.Node) -> fx.Node: ...

    def carried(self, node: object) -> tuple[fx.Node, Layout] | None: ...

    def claims(self, node: fx.Node) -> bool: ...

    def constant(self, node: object) -> torch.Tensor | None: ...

    def add_constant(self, value: torch.Tensor, name: str) -> fx.Node: ...


class Propagator(Protocol):
    """Carries a non-candidate node into a layout; True when it did (then no later propagator is asked)."""

    def propagate(self, node: fx.Node, rw: RuleContext) -> bool: ...


@dataclass(frozen=True)
class RuleSet:
    """The rules of one direction in priority order, and the propagators asked for every other node, in order."""

    direction: str
    rules: tuple[Rule, ...]
    propagators: tuple[Propagator, ...] = ()

    def claim(self, node: fx.Node, rw: RuleContext) -> tuple[Rule, str] | None:
        """The first rule that claims ``node``, with the site name."""
        for rule in self.rules:
            name = rule.claims(node, rw)
            if name is not None:
                return rule, name
        return None

    @property
    def patterns(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(r.pattern for r in self.rules))


def module_skip_reason(name: str, mod: nn.Module, exact_types: tuple[type, ...], rw: RuleContext) -> str | None:
    """Why a module-call site must be left alone, or None.

    Hooks, parametrizations and subclasses would be dropped by a replacement layer; a module called more than once
    or a parameter shared with another module would be split in two.
    """
    for sub_name, sub in mod.named_modules():  # the layer and the layers inside it (an attention's out_proj)
        which = f"{name}.{sub_name}" if sub_name else "it"
        if parametrize.is_parametrized(sub):
            names = ", ".join(sorted(sub.parametrizations.keys()))
            return (
                f"{which} is parametrized ({names}: weight_norm/spectral_norm-style); the parametrization would "
                "be dropped"
            )
        hooks = hook_kinds(sub)
        if hooks:
            return f"{which} has {' and '.join(hooks)}, which a replacement layer would not run"
    if type(mod) not in exact_types:
        return f"{type(mod).__name__} is a subclass of {exact_types[0].__name__} whose forward may differ"
    for attr in ("weight", "bias"):
        value = getattr(mod, attr, None)
        if isinstance(value, torch.Tensor) and type(value) not in (torch.Tensor, nn.Parameter):
            return (
                f"its {attr} is a quantized tensor subclass ({type(value).__name__}, as torchao's quantize_ makes): "
                "quantize with PT2E and rewrite the converted program, or rewrite the float model and quantize "
                "it after with PT2E (quantize_ quantizes nn.Linear only; docs/quantization.md)"
            )
        if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
            return f"its {attr} is a buffer or a plain tensor, not an nn.Parameter (a frozen or quantised layer?)"
    for pname, p in mod.named_parameters(recurse=False):
        reason = shared_reason(p, f"{name}.{pname}", rw)
        if reason:
            return reason
    return None


def shared_reason(p: torch.Tensor, qualname: str, rw: RuleContext, site: fx.Node | None = None) -> str | None:
    """Why parameter ``p`` (named ``qualname`` in the graph) cannot be re-laid out: another module shares it, or
    code other than the ``site`` reads it."""
    others = [o.rsplit(".", 1)[0] or o for o in rw.param_owners.get(id(p), []) if o != qualname]
    others += [who for who, user in rw.param_readers.get(id(p), []) if user is not site]
    if not others:
        return None
    return f"{qualname.rsplit('.', 1)[-1]} shared with {others[0]} (tied weights)"


def weight_skip_reason(weight: object, rw: RuleContext, site: fx.Node | None = None) -> str | None:
    """Why the weight of a functional site (``F.linear(x, self.weight)`` read by ``get_attr``) must be left alone:
    a parameter tied to another module, or None."""
    if not (isinstance(weight, fx.Node) and weight.op == "get_attr"):
        return None
    target = str(weight.target)
    owner, _, attr = target.rpartition(".")
    p = getattr(rw.modules[owner], attr, None)
    return shared_reason(p, target, rw, site) if isinstance(p, torch.Tensor) else None


def feeds_candidate(
    start: fx.Node, rw: RuleContext, through: Sequence[type] = (), depth: int = 16, moves: Collection[Any] = ()
) -> bool:
    """Whether a site of the rule set reads ``start``, or an elementwise op joins it with a value already carried in
    a layout (a residual add), through elementwise ops, modules of the exact types ``through`` and ops whose target
    is in ``moves`` (reshapes the rule set carries) only: then carrying ``start`` in that layout saves a conversion
    instead of adding one."""
    frontier = [start]
    for _ in range(depth):
        nxt = []
        for n in frontier:
            for u in n.users:
                if rw.claims(u) and (u.args[:1] or (None,))[0] is n:
                    return True
                is_through = (
                    u.op == "call_module"
                    and type(rw.modules.get(str(u.target))) in tuple(through)
                    or (u.op in ("call_method", "call_function") and u.target in moves and u.args[:1] == (n,))
                )
                inputs = elementwise_tensor_inputs(u, rw.modules)
                if inputs and any(i is not n and i in rw.alt for i in inputs):
                    return True
                if is_through or inputs:
                    nxt.append(u)
        if not nxt:
            return False
        frontier = nxt
    return False
