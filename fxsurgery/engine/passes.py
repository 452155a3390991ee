"""The rewrites as graph passes over exported programs, run by the one engine (:class:`~fxsurgery.engine.rewriter.
Rewriter`) with the rules of :mod:`fxsurgery.rules.aten`: ``torch.fx.passes.infra.pass_base.PassBase`` objects for
ATen graphs (``ExportedProgram.graph_module``) and ExecuTorch Edge graphs, e.g.::

    edge = to_edge_transform_and_lower(ep, transform_passes=[LinearToConvPass()], partitioner=[...])

Parameters stay graph inputs (placeholders): the passes add no parameter and copy none; the new kernels are views of
the originals computed in the graph (``view(W, (O, C, kh, kw))``), so the program's state dict is unchanged. Ops are
emitted in the dialect of the op they replace (``torch.ops.aten`` or ExecuTorch's ``exir_ops.edge.aten``), with
fake-tensor ``val`` and the replaced node's ``nn_module_stack`` and ``stack_trace``. ExecuTorch is not imported
unless the graph holds Edge ops.

* :class:`LinearToConvPass`: ``linear->conv`` (:mod:`fxsurgery.rules.aten.linear_to_conv`);
* :class:`ConvToLinearPass`: ``conv->linear`` (:mod:`fxsurgery.rules.aten.conv_to_linear`).

Without ExecuTorch, :func:`transform` runs passes on a copy of an ``ExportedProgram``; in a quantized program it then
makes each reshaped int8 weight a constant of its own (a view: :mod:`fxsurgery.engine.constants`).

Every candidate ends in ``sites`` (:class:`~fxsurgery.report.Site`): rewritten, or skipped with its reason. The
passes prove nothing themselves: check the program they return against the original (``ep.module()(x)``), or use
:func:`fxsurgery.linear_to_conv` on the ``ExportedProgram``, which validates.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from fxsurgery.engine.constants import fold_constant_views
from fxsurgery.engine.rewriter import Rewriter
from fxsurgery.report import Site
from fxsurgery.rules.aten import QUANTIZED_PATTERNS, rule_set
from fxsurgery.rules.aten.qdq import DEQUANTIZE

__all__ = ["LinearToConvPass", "ConvToLinearPass", "transform", "PASSES"]

_OUTSIDE_A_PROGRAM = (
    "quantized: its int8 weight must become a constant of the program, which a pass over a graph alone cannot "
    "add (ExecuTorch's partitioners would not delegate it); run fxsurgery.engine.passes.transform(program, "
    "pass) on the ExportedProgram before to_edge_transform_and_lower"
)


class _EnginePass(PassBase):
    """The direction's ATen rules over a graph, by the one engine; ``sites`` lists every candidate of the last call."""

    direction = ""

    def __init__(self, exclude: Sequence[str] = ()) -> None:
        super().__init__()
        self.exclude = list(exclude)
        self.sites: list[Site] = []
        self.in_program = False  # run by transform, which makes reshaped int8 weights constants afterwards

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        rules = rule_set(self.direction)
        skip = {} if self.in_program else dict.fromkeys(QUANTIZED_PATTERNS, _OUTSIDE_A_PROGRAM)
        rw = Rewriter(graph_module, rules, self.exclude, skip=skip)
        self.sites = rw.run()
        uneven = rw.unevenly_shared()  # (an ATen graph calls no module: layers are ops on their own weights)
        if uneven:
            raise RuntimeError(f"modules replaced at some calls only: {sorted(uneven)}")
        modified = any(s.status == "rewritten" for s in self.sites)  # a failed site's nodes are removed by the engine
        if modified:  # what the replaced ops read and nothing else reads (the flatten, the weight's transpose)
            graph_module.graph.eliminate_dead_code()
            graph_module.graph.lint()
            graph_module.recompile()
        return PassResult(graph_module, modified)


class LinearToConvPass(_EnginePass):
    """Linear -> Conv2d on an exported graph: HxW for a flattened map, 1x1 otherwise (see the module docstring)."""

    direction = "linear_to_conv"


class ConvToLinearPass(_EnginePass):
    """Pointwise Conv2d -> Linear (``addmm`` on channels-last rows) on an exported graph."""

    direction = "conv_to_linear"


#: the pass of each direction
PASSES: dict[str, type[_EnginePass]] = {"linear_to_conv": LinearToConvPass, "conv_to_linear": ConvToLinearPass}


def transform(program: torch.export.ExportedProgram, *passes: PassBase) -> torch.export.ExportedProgram:
    """A new ``ExportedProgram``: ``passes`` run on a copy of ``program``'s graph (``program`` is left as it is);
    both programs share the weight tensors. In a quantized program, each int8 weight the passes reshaped becomes a
    constant of its own (a view of the same tensor: :mod:`fxsurgery.engine.constants`), as ExecuTorch's partitioners
    need; run quantized programs through this, not through ``to_edge_transform_and_lower(transform_passes=...)``."""
    import copy

    tensors = [*program.state_dict.values(), *program.constants.values()]
    memo: dict[int, Any] = {id(t): t for t in tensors if isinstance(t, torch.Tensor)}
    for p in passes:
        if isinstance(p, _EnginePass):
            p.in_program = True
    new = copy.deepcopy(program, memo)._transform_do_not_use(*passes)
    fold_constant_views(new, DEQUANTIZE)
    return new
