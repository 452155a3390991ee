"""The graph-rewriting engine shared by both directions.

* :mod:`~fxsurgery.engine.rule`: what a rule is (``claims`` -> ``match`` -> ``apply``), rule sets, shared checks.
* :mod:`~fxsurgery.engine.rewriter`: one pass of a rule set over a GraphModule, with the layout bookkeeping.
* :mod:`~fxsurgery.engine.layout`: layouts (enter, exit) and permutation helpers.
* :mod:`~fxsurgery.engine.nodes`: the op-normalising view of nodes the rules match through.
* :mod:`~fxsurgery.engine.elementwise`: the table of elementwise ops.
* :mod:`~fxsurgery.engine.propagate`: propagators every rule set can use.
* :mod:`~fxsurgery.engine.cleanup`: the steps that end a pass.
* :mod:`~fxsurgery.engine.subgraph`: each site's neighbourhood before and after the pass, for the report.
* :mod:`~fxsurgery.engine.provenance`: the metadata every node a pass adds takes from the node it replaces.
* :mod:`~fxsurgery.engine.emit`: node builders rules share, and the emitter of ops in an exported graph's dialect.
* :mod:`~fxsurgery.engine.passes`: the engine as ``PassBase`` passes over exported and ExecuTorch Edge graphs.
* :mod:`~fxsurgery.engine.weights` and :mod:`~fxsurgery.engine.layers`: weight views, and the layers rewritten graphs
  install.
"""

from __future__ import annotations

from fxsurgery.engine.layout import Layout, permutation_layout, permute_dims
from fxsurgery.engine.rewriter import Rewriter
from fxsurgery.engine.rule import Match, Propagator, Rule, RuleSet, Skip

__all__ = ["Layout", "permutation_layout", "permute_dims", "Rewriter", "Match", "Propagator", "Rule", "RuleSet", "Skip"]
