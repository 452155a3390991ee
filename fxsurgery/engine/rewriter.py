"""The rewriter: one pass of a :class:`~fxsurgery.engine.rule.RuleSet` over one GraphModule.

A rule turns a candidate node into new nodes that compute the same values in another *layout*. The rewriter keeps,
for each original node, its counterpart in that layout (``alt``), lets propagators carry non-candidate nodes into it,
so that consecutive sites share it, and finally (:mod:`~fxsurgery.engine.cleanup`) converts back only where a
consumer outside the region needs the original layout and removes the original nodes left without users.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping, Sequence

import torch.fx as fx
from torch import nn

from fxsurgery.engine import cleanup, provenance, subgraph
from fxsurgery.engine.layout import Layout, composes_to_identity, permute_dims
from fxsurgery.engine.nodes import NoShape, first_input, reader_name
from fxsurgery.engine.rule import Rule, RuleSet, Skip
from fxsurgery.report import Site

__all__ = ["Rewriter", "CONSTANT_INPUT"]

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
    ) -> None:
        """``tied`` names parameters of ``gm`` shared with modules outside it (an untraceable parent's other
        children), by the owner outside: their layers are left alone like any other tied weight. ``skip`` maps
        the patterns to leave alone (a deployment target's) to the reason their sites report."""
        self.gm = gm
        self.graph = gm.graph
        self.rules = rules
        self.modules: dict[str, nn.Module] = dict(gm.named_modules())
        self.exclude = set(exclude)
        self.skip = dict(skip or {})
        self.alt: dict[fx.Node, tuple[fx.Node, Layout]] = {}
        self.sites: list[Site] = []
        self._pictures: list[tuple[int, int, subgraph.Before]] = []  # per rule call: first site, count, neighbourhood
        self.new_modules: dict[str, nn.Module] = {}
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
        self._seen_modules: set[str] = set()
        # values that depend on a model input (the rest is constant: parameters and buffers only)
        self.dynamic: set[fx.Node] = set()
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
            cleanup.finish(self)
            provenance.from_neighbours(created, self.original_nodes)
        self.sites = subgraph.attach(
            self.sites, self._pictures, self.alt, self.original_nodes, dict(self.gm.named_modules())
        )
        return self.sites

    def _visit(self, node: fx.Node) -> None:
        claimed = self.rules.claim(node, self)
        if claimed is not None:
            self._site(node, *claimed)
            return
        for propagator in self.rules.propagators:
            if propagator.propagate(node, self):
                return

    def _site(self, node: fx.Node, rule: Rule, name: str) -> None:
        if node.op == "call_module":
            if name in self._seen_modules:
                return  # one Site per module; a module called twice was skipped at its first call
            self._seen_modules.add(name)
        reason = self._common_skip(node, name) or self.skip.get(rule.pattern)
        before = subgraph.Before.record(node, self.modules)
        if reason is None:
            try:
                match = rule.match(node, self)
                if isinstance(match, Skip):
                    raise match
                done = rule.apply(match, self)
                sites = done if isinstance(done, tuple) else (done,)
                self._pictures.append((len(self.sites), len(sites), before))
                self.sites.extend(sites)
                return
            except (Skip, NoShape) as s:
                reason = str(s)
            except Exception as e:  # a rule bug must not become a wrong model: leave the site as it is, say why
                log.warning("rule %s failed on %s", type(rule).__name__, name, exc_info=True)
                reason = f"internal error while matching ({type(e).__name__}: {e}); please report it"
        self._pictures.append((len(self.sites), 1, before))
        self.sites.append(Site(name, rule.pattern, "skipped", reason))

    def _common_skip(self, node: fx.Node, name: str) -> str | None:
        """Why any site must be left alone, whatever its rule: excluded, constant, or a module called twice (a rule
        would replace both calls by one layout's layer)."""
        if name in self.exclude:
            return "excluded by the caller"
        first = first_input(node)
        if isinstance(first, fx.Node) and first not in self.dynamic:
            return CONSTANT_INPUT
        calls = self.module_calls[str(node.target)] if node.op == "call_module" else 1
        if calls > 1:
            return f"called {calls} times in forward (a shared layer); left as it is"
        return None
