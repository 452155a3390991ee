"""Constants of a graph: which values no model input reaches and a rewrite may compute ahead, and weights reshaped
in a quantized exported program made constants of their own.

:func:`constant_value` is what :meth:`~fxsurgery.engine.rewriter.Rewriter.constant` computes: a traced constant or
a non-persistent buffer that no op of the graph writes (:func:`written_attributes`), or ops that only move or select
the values of such constants (:data:`EXACT`), so that a constant entered into a layout once (a rotary table) holds
what the graph would compute, in any dtype.

The quantized rules reshape an int8 weight in the graph (``dq(view(W_int8, (O, C, 1, 1)))``), which keeps the
program's state unchanged; but a backend's partitioner (ExecuTorch's XNNPACK) delegates a quantized conv only when
its weight is ``dq(constant)``. :func:`fold_constant_views` makes each such view an input of the program, holding
a view of the same tensor (no copy), and drops the original input when nothing reads it any more.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.export.graph_signature import ExportGraphSignature, InputKind, InputSpec, TensorArgument
from torch.fx.node import map_aggregate

from fxsurgery.engine.emit import op_name
from fxsurgery.engine.nodes import writes_in_place

__all__ = ["fold_constant_views", "constant_value", "written_attributes", "EXACT"]

_VIEWS = ("aten::view", "aten::view_copy", "aten::reshape")
_CONSTANT = (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR)


def fold_constant_views(program: torch.export.ExportedProgram, readers: tuple[str, ...]) -> int:
    """In place: every view of a constant input of ``program`` that only ops named ``readers`` read (the
    dequantizes) becomes a constant input; returns how many."""
    graph = program.graph
    specs = list(program.graph_signature.input_specs)
    by_name = {s.arg.name: s for s in specs if isinstance(s.arg, TensorArgument)}
    values = {**program.state_dict, **program.constants}
    user = next(
        (n for n in graph.nodes if n.op == "placeholder" and by_name[n.name].kind == InputKind.USER_INPUT), None
    )
    anchor = user if user is not None else next(n for n in graph.nodes if n.op != "placeholder")
    folded = 0
    for node in list(graph.nodes):
        src = node.args[0] if op_name(node.target) in _VIEWS else None
        spec = by_name.get(getattr(src, "name", ""))
        if spec is None or spec.kind not in _CONSTANT or not node.users:
            continue
        if not all(op_name(u.target) in readers for u in node.users):
            continue
        data = values[str(spec.target)].detach().view(node.meta["val"].shape)
        with graph.inserting_before(anchor):
            new = graph.placeholder(f"{src.name}_{'x'.join(map(str, data.shape))}")  # type: ignore[union-attr]
        new.meta = {"val": node.meta["val"]}
        program.constants[new.name] = data
        specs.insert(
            _placeholder_index(graph, new), InputSpec(InputKind.CONSTANT_TENSOR, TensorArgument(new.name), new.name)
        )
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        if not src.users:  # type: ignore[union-attr]
            specs.remove(spec)
            graph.erase_node(src)
            if not any(s.target == spec.target for s in specs):
                (program.state_dict if str(spec.target) in program.state_dict else program.constants).pop(
                    str(spec.target)
                )
        folded += 1
    program._graph_signature = ExportGraphSignature(specs, program.graph_signature.output_specs)
    program.graph_module.recompile()
    return folded


def _placeholder_index(graph: torch.fx.Graph, node: torch.fx.Node) -> int:
    return [n for n in graph.nodes if n.op == "placeholder"].index(node)


#: Ops that move or select values without computing new ones: a constant made of them is the same computed ahead in
#: any dtype (a float64 copy of the rewritten model holds what the original computes in float64).
EXACT = frozenset(
    {"getitem", "chunk", "split", "tensor_split", "unbind", "select", "narrow", "slice", "view", "reshape", "flatten"}
    | {"unflatten", "permute", "transpose", "t", "unsqueeze", "squeeze", "expand", "contiguous", "clone", "detach"}
    | {"cat", "stack", "neg", "alias", "_unsafe_view"}
)


def written_attributes(graph: fx.Graph, modules: dict[str, nn.Module]) -> set[str]:
    """The attributes (buffers, constants) an op of ``graph`` writes."""
    return {str(n.target) for n in graph.find_nodes(op="get_attr") if _written(n, modules)}


def _written(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether an op writes the value ``node`` reads: in place (:func:`~fxsurgery.engine.nodes.writes_in_place`:
    ``buf.copy_(x)``, ``buf += x``), by ``buf[i] = x``, or an aten op whose schema says it mutates."""
    return any(
        writes_in_place(u, modules)
        or u.target is operator.setitem
        or getattr(getattr(u.target, "_schema", None), "is_mutable", False)
        for u in node.users
    )


def constant_value(
    node: fx.Node, modules: Mapping[str, nn.Module], constant: Callable[[object], object], written: set[str]
) -> object:
    """What :meth:`~fxsurgery.engine.rewriter.Rewriter.constant` computes for a node not yet seen (``constant``: its
    own lookup, for the node's inputs; ``written``: :func:`written_attributes`), or a tuple of tensors (``chunk``'s);
    None where it is not a constant to compute ahead."""
    if node.op == "get_attr":
        owner, _, attr = str(node.target).rpartition(".")
        holder = modules.get(owner)
        value = getattr(holder, attr, None)
        if not isinstance(value, torch.Tensor) or isinstance(value, nn.Parameter) or value.is_meta:
            return None
        persistent = attr in getattr(holder, "_buffers", {}) and attr not in holder._non_persistent_buffers_set  # type: ignore[union-attr]
        traced = attr.startswith("_tensor_constant")  # torch.fx keeps a tensor the code made as such a buffer
        return None if persistent and not traced or str(node.target) in written else value
    name = getattr(node.target, "__name__", str(node.target)).split(".")[0]  # (``aten.chunk.default``: chunk)
    if node.op not in ("call_function", "call_method") or name not in EXACT:
        return None  # arithmetic (rounded as the model's dtype is), random or in place: computed where it is
    inputs = node.all_input_nodes
    values = [constant(n) for n in inputs]
    if not inputs or any(v is None for v in values):
        return None
    lookup: dict[fx.Node, Any] = dict(zip(inputs, values))
    args, kwargs = map_aggregate((node.args, node.kwargs), lambda a: lookup[a] if isinstance(a, fx.Node) else a)
    fn: Any = getattr(args[0], str(node.target)) if node.op == "call_method" else node.target
    try:
        with torch.no_grad():
            out = fn(*args[1:], **kwargs) if node.op == "call_method" else fn(*args, **kwargs)
    except Exception:  # (an op that does not run outside its graph: the value stays computed there)
        return None
    tensors = isinstance(out, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in out)
    return out if isinstance(out, torch.Tensor) or tensors else None
