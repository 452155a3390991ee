"""The rewriter: one pass of a :class:`~fxsurgery.engine.rule.RuleSet` over one GraphModule.

A rule turns a candidate node into new nodes that compute the same values in another *layout*. The rewriter keeps,
for each original node, its counterpart in that layout (``alt``), lets propagators carry non-candidate nodes into it,
so that consecutive sites share it, and finally (:mod:`~fxsurgery.engine.cleanup`) converts back only where a
consumer outside the region needs the original layout and removes the original nodes left without users.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from fxsurgery.capture.heap import settled_heap
from fxsurgery.engine import cleanup, constants, provenance, subgraph
from fxsurgery.engine.layout import Layout, composes_to_identity, permute_dims
from fxsurgery.engine.nodes import NoShape, first_input, reader_name
from fxsurgery.engine.rule import Rule, RuleSet, Skip
from fxsurgery.report import Site

__all__ = ["Rewriter", "CONSTANT_INPUT", "rewrite_alike"]

log = logging.getLogger(__name__)

CONSTANT_INPUT = (
    "its input is a constant (no model input reaches it, e.g. a relative-position table): export "
    "folds it, nothing to rewrite"
)


class Rewriter:
    """State of one pass over one GraphModule: the layouts carried so far, the sites, the modules to install."""

    def __init__(
        self,
        gm: fx.GraphModule,
        rules: RuleSet,
        exclude: Sequence[str] = (),
        tied: Mapping[str, str] | None = None,
        skip: Mapping[str, str] | None = None,
        held: Mapping[str, str] | None = None,
    ) -> None:
        """``tied`` names parameters of ``gm`` shared with modules outside it (an untraceable parent's other
        children), by the owner outside: their layers are left alone like any other tied weight. ``skip`` maps
        the patterns to leave alone (a deployment target's) to the reason their sites report; ``held`` maps
        modules to leave alone to theirs (shared modules whose calls cannot all be rewritten alike)."""
        self.gm = gm
        self.graph = gm.graph
        self.rules = rules
        self.modules: dict[str, nn.Module] = dict(gm.named_modules())
        self.exclude = set(exclude)
        self.skip = dict(skip or {})
        self.held = dict(held or {})
        self.alt: dict[fx.Node, tuple[fx.Node, Layout]] = {}
        self.sites: list[Site] = []
        self._pictures: list[tuple[int, int, subgraph.Before]] = []  # per rule call: first site, count, neighbourhood
        self._installs = _Installs()  # (rules see a dict: RuleContext)
        self.new_modules: dict[str, nn.Module] = self._installs
        self.exits: dict[fx.Node, fx.Node] = {}
        self._enters: dict[tuple[fx.Node, str], fx.Node] = {}
        self.original_nodes = set(self.graph.nodes)
        self.module_calls = Counter(str(n.target) for n in self.graph.nodes if n.op == "call_module")
        self.param_owners: dict[int, list[str]] = {}
        for pname, p in gm.named_parameters(remove_duplicate=False):
            self.param_owners.setdefault(id(p), []).append(pname)
            if tied and pname in tied:
                self.param_owners[id(p)].append(f"{tied[pname]}.(outside)")
        # code that reads a parameter directly (``F.embedding(ids, self.lm_head.weight)``; torch.export names a
        # tied weight once and reads it so): (who reads it, the reading node)
        self.param_readers: dict[int, list[tuple[str, fx.Node]]] = {}
        params = dict(gm.named_parameters(remove_duplicate=False))
        for n in self.graph.nodes:
            if n.op == "get_attr" and str(n.target) in params:
                for user in n.users:
                    self.param_readers.setdefault(id(params[str(n.target)]), []).append((reader_name(user), user))
        self._listed: dict[str, int] = {}  # a module's site (listed at its first call): its place in ``sites``
        self._call_skips: dict[str, str] = {}  # a module's first skipped call: why
        self._as_linear: Counter[str] = Counter()  # calls of a replaced Linear left as F.linear on its new weight
        # values that depend on a model input (the rest is constant: parameters and buffers only)
        self.dynamic: set[fx.Node] = set()
        self._constants: dict[fx.Node, object] = {}
        self._written: set[str] | None = None  # the attributes an in-place op of the graph writes
        for n in self.graph.nodes:
            if n.op == "placeholder" or any(i in self.dynamic for i in n.all_input_nodes):
                self.dynamic.add(n)

    # -- layout bookkeeping -------------------------------------------------------------------------------------
    def set_alt(self, node: fx.Node, alt: fx.Node, layout: Layout) -> None:
        """``alt`` computes ``node``'s value in ``layout``."""
        self.alt[node] = (alt, layout)

    def seed(self, node: fx.Node, alt: fx.Node, layout: Layout) -> None:
        """``node`` already has a counterpart ``alt`` in ``layout`` (``z.permute(0, 2, 3, 1)`` is ``z`` in NCHW).

        ``node`` itself stays the original-layout value for consumers outside the layout: no conversion is added.
        """
        self.alt[node] = (alt, layout)
        self.exits[node] = node

    def enter(self, node: fx.Node, layout: Layout, site: str) -> fx.Node:
        """``node`` in ``layout``: its counterpart if it has one, else a conversion (built once)."""
        if node in self.alt and self.alt[node][1] is layout:
            return self.alt[node][0]
        source = self.exit_of(node) if node in self.alt else node
        dims = permute_dims(source)
        if layout.to_alt is not None and dims is not None and composes_to_identity(dims, layout.to_alt):
            return source.args[0]  # type: ignore[return-value]  # the permute undoes itself
        key = (source, layout.name)
        if key not in self._enters:
            with self.graph.inserting_before(source.next):  # keeps a multi-node conversion in order
                self._enters[key] = layout.enter(self.graph, source, site)
        return self._enters[key]

    def exit_of(self, node: fx.Node) -> fx.Node:
        """The original-layout value of ``node``: itself, or one conversion back from its counterpart."""
        if node not in self.alt:
            return node
        if node not in self.exits:
            alt, layout = self.alt[node]
            with self.graph.inserting_before(alt.next):
                self.exits[node] = layout.exit(self.graph, alt, node)
        return self.exits[node]

    def carried(self, node: object) -> tuple[fx.Node, Layout] | None:
        """``(alt, layout)`` when ``node`` is carried in a layout."""
        return self.alt.get(node) if isinstance(node, fx.Node) else None

    def claims(self, node: fx.Node) -> bool:
        """Whether a rule of the set claims ``node``."""
        return self.rules.claim(node, self) is not None

    def constant(self, node: object) -> torch.Tensor | None:
        """The tensor ``node`` computes when neither a model input nor the state dict reaches it: a traced constant
        or a non-persistent buffer that the graph does not write (a rotary table), or ops that only move or select
        the values of such constants (the table split by ``chunk``), computed here once
        (:func:`~fxsurgery.engine.constants.constant_value`); else None (a parameter or a persistent buffer, which
        loading a state dict may change; a value on the meta device; arithmetic)."""
        value = self._constant(node)
        return value if isinstance(value, torch.Tensor) else None

    def _constant(self, node: object) -> object:
        """:meth:`constant`, or a tuple of tensors (``chunk``'s) whose items are."""
        if not isinstance(node, fx.Node) or node in self.dynamic:
            return None
        if self._written is None:
            self._written = constants.written_attributes(self.graph, self.modules)
        if node not in self._constants:
            self._constants[node] = constants.constant_value(node, self.modules, self._constant, self._written)
        return self._constants[node]

    def add_constant(self, value: torch.Tensor, name: str) -> fx.Node:
        """A new constant of the graph holding ``value`` (a constant already in a layout), read where the graph is
        being built."""
        attr = f"_{name.lstrip('_')}_carried"
        while hasattr(self.gm, attr):
            attr += "_"
        self.gm.register_buffer(attr, value, persistent=False)  # .to() / .double() convert it as the model's
        return self.graph.get_attr(attr)

    # -- the pass -----------------------------------------------------------------------------------------------
    def run(self) -> list[Site]:
        """Visit every node once, in order: a claimed node is a site, any other may be propagated; then clean up."""
        with provenance.recording(self.graph) as created:
            for node in list(self.graph.nodes):
                if node._erased:  # (a rule removed it with its site: the end of a quantized island)
                    continue
                if node not in self.alt:  # (else already carried: an item of a rewritten call's output)
                    self._visit(node)
                provenance.inherit(created, node)  # what the rule or propagator added, in place of ``node``
            self._linear_where_left()
            cleanup.finish(self)
            provenance.from_neighbours(created, self.original_nodes)
        sites = [self._shared_site(s) for s in self.sites]
        self.sites = subgraph.attach(
            sites, self._pictures, self.alt, self.original_nodes, dict(self.gm.named_modules())
        )
        return self.sites

    def unevenly_shared(self) -> dict[str, str]:
        """After :meth:`run`: the shared modules (called more than once) this pass replaced at some of their calls
        but not all, or by different layers at different calls (the graph is then wrong), each with why. A pass on a
        fresh graph that holds them (``held``) is right: :func:`rewrite_alike`."""
        left = {str(n.target) for n in self.original_nodes if n.op == "call_module" and not n._erased}
        out = {}
        for name in sorted((left & self.new_modules.keys()) | self._installs.conflicts):
            why = self._call_skips.get(name)
            detail = f"one of them cannot be: {why}" if why else "they would need different layers"
            out[name] = (
                f"called {self.module_calls[name]} times in forward (a shared layer), and not every call can be "
                f"rewritten alike ({detail}); left as it is"
            )
        return out

    def _linear_where_left(self) -> None:
        """A shared Linear replaced by a 1x1 conv at some calls and left at others (DeBERTa's shared key projection
        also reads the relative-position table, a constant): each call left becomes the Linear computed on the
        conv's weight viewed back, ``F.linear(x, weight.flatten(1), bias)``, so that the name holds one layer."""
        left = [n for n in self.original_nodes if n.op == "call_module" and not n._erased and n not in self.alt]
        for node in left:
            name = str(node.target)
            new = self.new_modules.get(name)
            if type(self.modules.get(name)) is not nn.Linear or not _pointwise_conv(new) or node.kwargs:
                continue
            with self.graph.inserting_before(node):
                weight = self.graph.call_method("flatten", (self.graph.get_attr(f"{name}.weight"), 1))
                bias = self.graph.get_attr(f"{name}.bias") if new.bias is not None else None  # type: ignore[union-attr]
                linear = self.graph.call_function(F.linear, (*node.args, weight, bias))
            linear.meta = dict(node.meta)
            node.replace_all_uses_with(linear)
            self.graph.erase_node(node)
            self._as_linear[name] += 1

    def _shared_site(self, site: Site) -> Site:
        calls, left = self.module_calls.get(site.name, 1), self._as_linear[site.name]
        if not site.rewritten or calls < 2:
            return site
        if not left:
            return dataclasses.replace(site, after=f"{site.after} (the same at each of its {calls} calls)", calls=calls)
        why = self._call_skips.get(site.name, "")
        after = f"{site.after} (one layer for its {calls} calls; {left} not rewritten, F.linear on its weight: {why})"
        return dataclasses.replace(site, after=after, calls=calls - left)

    def _visit(self, node: fx.Node) -> None:
        claimed = self.rules.claim(node, self)
        if claimed is not None:
            self._site(node, *claimed)
            return
        for propagator in self.rules.propagators:
            if propagator.propagate(node, self):
                return

    def _site(self, node: fx.Node, rule: Rule, name: str) -> None:
        """Match and apply ``rule`` at ``node``, listing the outcome; a shared module is listed at its first call
        only, each later call is rewritten the same way (or the pass is redone holding it: :func:`rewrite_alike`)."""
        again = self._listed.get(name) if node.op == "call_module" else None
        reason = self._common_skip(node, name) or self.skip.get(rule.pattern)
        before = subgraph.Before.record(node, self.modules)
        if reason is None:
            try:
                match = rule.match(node, self)
                if isinstance(match, Skip):
                    raise match
                done = rule.apply(match, self)
                sites = done if isinstance(done, tuple) else (done,)
                if again is None:
                    self._list(node, name, sites, before)
                else:  # a later call of a listed module: a site listed as left at an earlier call is rewritten here
                    for site in sites:
                        at = self._listed.get(site.name)
                        if at is not None and not self.sites[at].rewritten:
                            self.sites[at] = site
                return
            except (Skip, NoShape) as s:
                reason = str(s)
            except Exception as e:  # a rule bug must not become a wrong model: leave the site as it is, say why
                log.warning("rule %s failed on %s", type(rule).__name__, name, exc_info=True)
                reason = f"internal error while matching ({type(e).__name__}: {e}); please report it"
        self._call_skips.setdefault(name, reason)
        if again is None:
            self._list(node, name, (Site(name, rule.pattern, "skipped", reason),), before)

    def _list(self, node: fx.Node, name: str, sites: Sequence[Site], before: subgraph.Before) -> None:
        """Add the sites of one rule call at ``node`` (claimed as ``name``): a module's sites are listed once, at
        its first call."""
        if node.op == "call_module":
            at = len(self.sites)
            self._listed.setdefault(name, at)
            self._listed.update({s.name: at + i for i, s in enumerate(sites) if s.name not in self._listed})
        self._pictures.append((len(self.sites), len(sites), before))
        self.sites.extend(sites)

    def _common_skip(self, node: fx.Node, name: str) -> str | None:
        """Why any site must be left alone, whatever its rule: excluded, held (a shared module whose calls differ),
        or constant."""
        if name in self.exclude:
            return "excluded by the caller"
        if name in self.held:
            return self.held[name]
        first = first_input(node)  # (a node a rule added computes from a model input: rules rewrite only those)
        if isinstance(first, fx.Node) and first not in self.dynamic and first in self.original_nodes:
            return CONSTANT_INPUT
        return None


class _Installs(dict[str, nn.Module]):
    """The new modules of a pass, by the name they replace; a name given two different layers (a shared module whose
    calls would each need another) is remembered in ``conflicts``."""

    def __init__(self) -> None:
        super().__init__()
        self.conflicts: set[str] = set()

    def __setitem__(self, name: str, mod: nn.Module) -> None:
        if name in self and _signature(self[name]) != _signature(mod):
            self.conflicts.add(name)
        super().__setitem__(name, mod)


def _pointwise_conv(mod: object) -> bool:
    """A plain 1x1 ``Conv2d`` (what a Linear becomes on a value carried with its features on dim 1)."""
    return (
        type(mod) is nn.Conv2d
        and mod.kernel_size == (1, 1)
        and mod.stride == (1, 1)
        and mod.padding == (0, 0)
        and mod.dilation == (1, 1)
        and mod.groups == 1
    )


def _signature(mod: nn.Module) -> tuple[object, ...]:
    """What makes two replacement layers the same layer: class, hyperparameters, and tensors viewing the same memory
    the same way."""
    tensors = mod.state_dict(keep_vars=True).items()
    return type(mod), repr(mod), tuple((k, t.shape, t.stride(), t.dtype, t.data_ptr()) for k, t in tensors)


@settled_heap()
def rewrite_alike(
    fresh: Callable[[], fx.GraphModule],
    rules: RuleSet,
    exclude: Sequence[str] = (),
    tied: Mapping[str, str] | None = None,
    skip: Mapping[str, str] | None = None,
) -> Rewriter:
    """A finished pass over ``fresh()``; where a shared module's calls came out unalike, again over a new
    ``fresh()`` holding those modules (each pass holds more, so this ends)."""
    held: dict[str, str] = {}
    while True:
        rw = Rewriter(fresh(), rules, exclude, tied, skip, held)
        rw.run()
        uneven = rw.unevenly_shared()
        if not uneven:
            return rw
        if uneven.keys() <= held.keys():
            raise RuntimeError(f"shared modules held and still replaced: {sorted(uneven)}")
        held |= uneven
