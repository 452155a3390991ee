"""The graph-rewriting engine shared by both directions.

A rule turns a candidate node into new nodes that compute the same values in another *layout* (a 2-D Linear
output carried as ``(N, O, 1, 1)``; an NCHW map carried channels-last as ``(N, H, W, C)``). The engine keeps, for each
original node, its counterpart in the other layout, lets elementwise ops run on that counterpart so that consecutive
sites share it, and converts back (one node) only where a consumer outside the region needs the original layout.
Original nodes left without users are then removed, so the graph holds no reshape ping-pong between sites.
"""

from __future__ import annotations

import logging
import operator
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.fx as fx
from torch import nn
from torch.nn.utils import parametrize

from fxsurgery import _runtime
from fxsurgery.checkpoint import record_layout
from fxsurgery.result import Site
from fxsurgery.rules._ops import elementwise_tensor_inputs
from fxsurgery.tracing import shape_of

__all__ = ["Layout", "Rewriter", "Rule", "Skip", "feeds_candidate", "module_skip_reason", "guard", "permutation_layout",
           "permute_dims"]

log = logging.getLogger(__name__)


class Skip(Exception):
    """Raised inside a rule to skip the current site; the message is the site's reason."""


@dataclass(frozen=True)
class Layout:
    """An alternative layout: ``enter`` builds it from an original node, ``exit`` converts back (both return the
    last node they add).

    ``to_alt`` is the permutation ``enter`` applies when the layout is a pure permutation: a ``permute`` that would
    undo a conversion is then cancelled instead of added.
    """

    name: str
    enter: Callable[[fx.Graph, fx.Node, str], fx.Node]
    exit: Callable[[fx.Graph, fx.Node, fx.Node], fx.Node]
    to_alt: tuple[int, ...] | None = None


def permutation_layout(name: str, to_alt: tuple[int, ...]) -> Layout:
    """A layout that carries values permuted by ``to_alt`` (e.g. NCHW as NHWC)."""
    back = tuple(to_alt.index(i) for i in range(len(to_alt)))

    def enter(graph: fx.Graph, x: fx.Node, site: str) -> fx.Node:
        return graph.call_method("permute", (x, to_alt))

    def exit(graph: fx.Graph, alt: fx.Node, orig: fx.Node) -> fx.Node:
        return graph.call_method("permute", (alt, back))

    return Layout(name, enter, exit, to_alt)


def permute_dims(node: object) -> tuple[int, ...] | None:
    """The dims of ``node`` if it is ``x.permute(...)`` / ``torch.permute(x, ...)`` with constant dims, else None."""
    if not isinstance(node, fx.Node):
        return None
    if not (node.op == "call_method" and node.target == "permute") and not (
        node.op == "call_function" and node.target is torch.permute
    ):
        return None
    dims = node.kwargs["dims"] if "dims" in node.kwargs else node.args[1:]
    if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
        dims = dims[0]
    if not dims or not all(isinstance(d, int) for d in dims) or not isinstance(node.args[0], fx.Node):
        return None
    return tuple(d % len(dims) for d in dims)


def _composes_to_identity(first: tuple[int, ...], then: tuple[int, ...]) -> bool:
    """True when ``x.permute(first).permute(then)`` is ``x``."""
    return len(first) == len(then) and all(first[then[i]] == i for i in range(len(then)))


class Rule(Protocol):
    """A rewrite rule: ``is_candidate`` selects nodes; ``apply`` rewrites one (or raises :class:`Skip`);
    ``propagate`` may carry a non-candidate node into a layout (True when it did)."""

    pattern_names: Sequence[str]

    def propagate(self, node: fx.Node, rw: Rewriter) -> bool: ...

    def is_candidate(self, node: fx.Node, rw: Rewriter) -> bool: ...

    def apply(self, node: fx.Node, rw: Rewriter) -> Site: ...

    def describe(self, node: fx.Node, rw: Rewriter) -> tuple[str, str]:
        """(site name, pattern) for a site that is skipped before a pattern was matched."""
        ...


def guard(graph: fx.Graph, x: fx.Node, spatial: tuple[int, ...], site: str, original_rejects: bool) -> fx.Node:
    """Insert a run-time check that ``x`` still has the traced spatial size."""
    return graph.call_function(_runtime.check_spatial_size, (x, spatial, site, original_rejects))


def module_skip_reason(name: str, mod: nn.Module, exact_types: tuple[type, ...], rw: Rewriter) -> str | None:
    """Why a module-call site must be left alone, or None.

    Hooks, parametrizations and subclasses would be dropped by a replacement layer; a module called more than once
    or a parameter shared with another module would be split in two.
    """
    if parametrize.is_parametrized(mod):
        names = ", ".join(sorted(mod.parametrizations.keys()))  # type: ignore[union-attr]
        return f"parametrized ({names}: weight_norm/spectral_norm-style); the parametrization would be dropped"
    if type(mod) not in exact_types:
        return f"{type(mod).__name__} is a subclass of {exact_types[0].__name__} whose forward may differ"
    hooks = [
        label
        for label, d in (
            ("forward hooks", mod._forward_hooks),
            ("forward pre-hooks", mod._forward_pre_hooks),
            ("backward hooks", mod._backward_hooks),
            ("backward pre-hooks", mod._backward_pre_hooks),
        )
        if d
    ]
    if hooks:
        return f"has {' and '.join(hooks)}, which a replacement layer would not run"
    if rw.module_calls[name] > 1:
        return f"called {rw.module_calls[name]} times in forward (a shared layer); left as it is"
    for pname, p in mod.named_parameters(recurse=False):
        others = [o for o in rw.param_owners.get(id(p), []) if o != f"{name}.{pname}"]
        if others:
            return f"{pname} shared with {others[0].rsplit('.', 1)[0] or others[0]} (tied weights)"
    return None


class Rewriter:
    """State of one pass over one GraphModule."""

    def __init__(self, gm: fx.GraphModule, exclude: Sequence[str] = ()) -> None:
        self.gm = gm
        self.graph = gm.graph
        self.modules: dict[str, nn.Module] = dict(gm.named_modules())
        self.exclude = set(exclude)
        self.alt: dict[fx.Node, tuple[fx.Node, Layout]] = {}
        self.sites: list[Site] = []
        self.new_modules: dict[str, nn.Module] = {}
        self._exits: dict[fx.Node, fx.Node] = {}
        self._enters: dict[tuple[fx.Node, str], fx.Node] = {}
        self.module_calls = Counter(str(n.target) for n in self.graph.nodes if n.op == "call_module")
        self.param_owners: dict[int, list[str]] = {}
        for pname, p in gm.named_parameters(remove_duplicate=False):
            self.param_owners.setdefault(id(p), []).append(pname)
        self._seen_modules: set[str] = set()
        # values that depend on a model input (the rest is constant: parameters and buffers only)
        self.dynamic: set[fx.Node] = set()
        for n in self.graph.nodes:
            if n.op == "placeholder" or any(i in self.dynamic for i in n.all_input_nodes):
                self.dynamic.add(n)

    # -- layout bookkeeping -------------------------------------------------------------------------------------
    def set_alt(self, node: fx.Node, alt: fx.Node, layout: Layout) -> None:
        self.alt[node] = (alt, layout)

    def seed(self, node: fx.Node, alt: fx.Node, layout: Layout) -> None:
        """``node`` already has a counterpart ``alt`` in ``layout`` (``z.permute(0, 2, 3, 1)`` is ``z`` in NCHW).

        ``node`` itself stays the original-layout value for consumers outside the layout: no conversion is added.
        """
        self.alt[node] = (alt, layout)
        self._exits[node] = node

    def enter(self, node: fx.Node, layout: Layout, site: str) -> fx.Node:
        """``node`` in ``layout``: its counterpart if it has one, else a conversion (built once)."""
        if node in self.alt and self.alt[node][1] is layout:
            return self.alt[node][0]
        source = self.exit_of(node) if node in self.alt else node
        dims = permute_dims(source)
        if layout.to_alt is not None and dims is not None and _composes_to_identity(dims, layout.to_alt):
            return source.args[0]  # type: ignore[return-value]  # the permute undoes itself
        key = (source, layout.name)
        if key not in self._enters:
            with self.graph.inserting_before(key[0].next):  # keeps a multi-node conversion in order
                self._enters[key] = layout.enter(self.graph, key[0], site)
        return self._enters[key]

    def exit_of(self, node: fx.Node) -> fx.Node:
        """The original-layout value of ``node``: itself, or one conversion back from its counterpart."""
        if node not in self.alt:
            return node
        if node not in self._exits:
            alt, layout = self.alt[node]
            with self.graph.inserting_before(alt.next):
                self._exits[node] = layout.exit(self.graph, alt, node)
        return self._exits[node]

    # -- the pass -----------------------------------------------------------------------------------------------
    def run(self, rule: Rule) -> list[Site]:
        for node in list(self.graph.nodes):
            if node in self.alt:
                continue  # already carried (an item of a rewritten call's output)
            if rule.is_candidate(node, self):
                self._apply(rule, node)
            elif not self._static_rank(node) and not rule.propagate(node, self):
                self._propagate(node)
        self._finish()
        return self.sites

    def _apply(self, rule: Rule, node: fx.Node) -> None:
        name, pattern = rule.describe(node, self)
        if node.op == "call_module":
            if name in self._seen_modules:
                return  # one Site per module; a module called twice was skipped at its first call
            self._seen_modules.add(name)
        if name in self.exclude:
            self.sites.append(Site(name, pattern, "skipped", "excluded by the caller"))
            return
        first = node.args[0] if node.args else next(iter(node.kwargs.values()), None)
        if isinstance(first, fx.Node) and first not in self.dynamic:
            reason = ("its input is a constant (no model input reaches it, e.g. Swin v2's relative-position MLP): "
                      "export folds it, nothing to rewrite")  # fmt: skip
            self.sites.append(Site(name, pattern, "skipped", reason))
            return
        try:
            site = rule.apply(node, self)
        except Skip as s:
            site = Site(name, pattern, "skipped", str(s))
        except Exception as e:  # a rule bug must not become a wrong model: leave the site as it is, say why
            log.warning("rule %s failed on %s", type(rule).__name__, name, exc_info=True)
            site = Site(name, pattern, "skipped", f"internal error while matching ({type(e).__name__}: {e}); "
                        "please report it")  # fmt: skip
        self.sites.append(site)

    def _static_rank(self, node: fx.Node) -> bool:
        """``x.dim()`` of a carried value is a constant: use it, so that a rank check (ViT's ``torch._assert(
        input.dim() == 3)``) does not need the value converted back. True when ``node`` was replaced."""
        if not (node.op == "call_method" and node.target == "dim" and len(node.args) == 1 and node.args[0] in self.alt):
            return False
        shape = shape_of(node.args[0])  # type: ignore[arg-type]
        if shape is None:
            return False
        rank = len(shape)
        for user in list(node.users):
            user.args = fx.map_arg(user.args, lambda a: rank if a is node else a)  # type: ignore[arg-type,return-value]
            user.kwargs = fx.map_arg(user.kwargs, lambda a: rank if a is node else a)  # type: ignore[arg-type,return-value]
        self.graph.erase_node(node)
        return True

    def _propagate(self, node: fx.Node) -> None:
        inputs = elementwise_tensor_inputs(node, self.modules)
        if not inputs:
            return
        layouts = {self.alt[i][1].name for i in inputs if i in self.alt}
        if len(layouts) != 1:
            return
        layout = next(self.alt[i][1] for i in inputs if i in self.alt)
        mapped = {i: self.enter(i, layout, node.name) for i in inputs}
        with self.graph.inserting_before(node):
            new = self.graph.node_copy(node, lambda a: mapped.get(a, a))
        new.meta = {}
        self.set_alt(node, new, layout)

    def _finish(self) -> None:
        for node in list(self.alt):
            alt, layout = self.alt[node]
            outside = [u for u in node.users if u not in self.alt]
            for u in list(outside):
                if not u.users and _erasable(u, self.modules):
                    self.graph.erase_node(u)  # unused (ViT's x.shape, read only for an assert message)
                    outside.remove(u)
                    continue
                dims = permute_dims(u)
                if layout.to_alt is not None and dims == layout.to_alt:
                    u.replace_all_uses_with(alt)  # the user permutes back to the layout we carry: cancel both
                    self.graph.erase_node(u)
                    outside.remove(u)
            if outside:
                back = self.exit_of(node)
                for u in outside:
                    if u is not back:
                        u.replace_input_with(node, back)
        # Original nodes now computed in another layout: remove them (last first), then whatever fed only them.
        # (Not graph.eliminate_dead_code(): it also drops in-place ops such as x.mul_(2) whose result is unused.)
        work = [n for n in self.graph.nodes if n.op == "call_function" and n.target is _runtime.check_spatial_size]
        for node in reversed(list(self.alt)):
            if not node.users and not node._erased:
                work.extend(node.all_input_nodes)
                self.graph.erase_node(node)
        while work:
            node = work.pop()
            if getattr(node, "_erased", False) or node.users or not _erasable(node, self.modules):
                continue
            inputs = list(node.all_input_nodes)
            self.graph.erase_node(node)
            work.extend(inputs)
        for name, mod in self.new_modules.items():
            old = self.modules[name]
            for pname, p in mod.named_parameters():
                record_layout(self.gm, f"{name}.{pname}", old.get_parameter(pname), p)
            self.gm.add_submodule(name, mod)
        self.graph.lint()
        self.gm.recompile()


_INPLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.setitem}


def _erasable(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether an unused node may be removed: no in-place op, no module with side effects, no graph input."""
    if node.op in ("placeholder", "output") or node.is_impure():
        return False
    target = node.target
    name = target if isinstance(target, str) else getattr(target, "__name__", "")
    if node.op != "get_attr" and (name.endswith("_") or target in _INPLACE_OPERATORS):  # relu_, mul_, +=, ...
        return False
    if node.op == "call_module":
        return elementwise_tensor_inputs(node, modules) is not None or isinstance(modules.get(str(target)), nn.Flatten)
    return True


def feeds_candidate(start: fx.Node, rw: Rewriter, rule: Rule, through: tuple[type, ...] = (), depth: int = 16) -> bool:
    """Whether a site of ``rule`` reads ``start``, or an elementwise op joins it with a value already carried in a
    layout (a residual add), through elementwise ops and modules of the exact types ``through`` only: then carrying
    ``start`` in that layout saves a conversion instead of adding one."""
    frontier = [start]
    for _ in range(depth):
        nxt = []
        for n in frontier:
            for u in n.users:
                if rule.is_candidate(u, rw) and (u.args[:1] or (None,))[0] is n:
                    return True
                is_through = u.op == "call_module" and type(rw.modules.get(str(u.target))) in through
                inputs = elementwise_tensor_inputs(u, rw.modules)
                if inputs and any(i is not n and i in rw.alt for i in inputs):
                    return True
                if is_through or inputs:
                    nxt.append(u)
        if not nxt:
            return False
        frontier = nxt
    return False


def static_shape(node: fx.Node, what: str) -> tuple[int, ...]:
    shape = shape_of(node)
    if shape is None:
        raise Skip(f"no static shape is known for {what} ({node.name})")
    return shape
