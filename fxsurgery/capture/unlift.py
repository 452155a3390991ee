"""An exported program's graph with its parameters, buffers and constants read as attributes again, as
``ExportedProgram.module()`` makes it, without what that call adds for a module to be run as it is: a graph module
built (Python code generated) three times over and a guard function. :func:`fxsurgery.capture.export.raise_program`
raises the graph at once into a module of its own over the model's copy (which holds those attributes), the one code
generation of the path: on Llama-3-70B shapes (80 blocks) ``module()`` took 0.9-1.4 s, this 0.1 s.
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.export.graph_signature import InputKind, OutputKind
from torch.fx.graph import _PyTreeCodeGen, _PyTreeInfo

__all__ = ["unlift"]

_LIFTED = (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR, InputKind.CUSTOM_OBJ)
_PLAIN = (*_LIFTED, InputKind.USER_INPUT, OutputKind.USER_OUTPUT)


def unlift(ep: torch.export.ExportedProgram) -> tuple[fx.Graph, Callable[[str], Any]]:
    """``ep``'s graph taking the user's inputs only, and a function giving the value of an attribute it reads that
    the model may not have (a constant the export lifted out of the code: ``lifted_tensor_0``)."""
    own = _unlifted_graph(ep)
    if own is not None:  # a constant, or a graph of a higher-order op (``submod_1`` of a no_grad region)
        graph, constants = own
        return graph, lambda target: constants[target] if target in constants else _attr(ep.graph_module, target)
    gm = ep.module()
    return gm.graph, lambda target: _attr(gm, target)


def _attr(module: nn.Module, target: str) -> Any:
    return operator.attrgetter(target)(module)


def _unlifted_graph(ep: torch.export.ExportedProgram) -> tuple[fx.Graph, dict[str, Any]] | None:
    """A copy of ``ep``'s graph taking the user's inputs only (``get_attr`` of each lifted parameter, buffer and
    constant instead; its outputs in their pytree structure), and the values of the lifted constants by name (one
    that requires grad detached, as ``module()`` does); ``None`` for a program this does not cover, which
    ``ep.module()`` then unlifts: other than torch.export's training IR (where an in-place op writes a buffer itself),
    such as a functionalized program returning its buffers' new values, or effect tokens."""
    signature, call = ep.graph_signature, ep.module_call_graph[0].signature
    kinds = [s.kind for s in (*signature.input_specs, *signature.output_specs)]
    if ep.verifiers[0].dialect != "TRAINING" or any(k not in _PLAIN for k in kinds) or not call:
        return None
    if not call.forward_arg_names or ep.call_spec.in_spec is None:
        return None
    graph = copy.deepcopy(ep.graph)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    for node, spec in zip(placeholders, signature.input_specs, strict=True):
        if spec.kind in _LIFTED and spec.target is not None:
            with graph.inserting_after(node):
                attr = graph.get_attr(spec.target)
            node.replace_all_uses_with(attr)
            attr.meta = node.meta
            graph.erase_node(node)
    graph._codegen = _PyTreeCodeGen(_PyTreeInfo(call.forward_arg_names, ep.call_spec.in_spec, ep.call_spec.out_spec))
    graph.lint()
    detached: dict[int, Any] = {}  # (two names of one tensor stay one tensor)
    return graph, {k: _detached(v, detached) for k, v in ep.constants.items()}


def _detached(value: Any, memo: dict[int, Any]) -> Any:
    if not (isinstance(value, torch.Tensor) and value.requires_grad):
        return value
    return memo.setdefault(id(value), value.detach())
