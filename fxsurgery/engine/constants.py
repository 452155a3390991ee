"""Weights reshaped in a quantized exported program become constants of their own.

The quantized rules reshape an int8 weight in the graph (``dq(view(W_int8, (O, C, 1, 1)))``), which keeps the
program's state unchanged; but a backend's partitioner (ExecuTorch's XNNPACK) delegates a quantized conv only when
its weight is ``dq(constant)``. :func:`fold_constant_views` makes each such view an input of the program, holding
a view of the same tensor (no copy), and drops the original input when nothing reads it any more.
"""

from __future__ import annotations

import torch
from torch.export.graph_signature import ExportGraphSignature, InputKind, InputSpec, TensorArgument

from fxsurgery.engine.emit import op_name

__all__ = ["fold_constant_views"]

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
