"""ExecuTorch with XNNPACK (optional: ``pip install "fxsurgery[executorch]"``): the model exported and lowered with
``to_edge_transform_and_lower``; run by ExecuTorch's pybindings, and its delegates and the ops left outside them
counted."""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch import nn

from fxsurgery.runtimes.registry import Backend

__all__ = ["Xnnpack", "lowered"]


def lowered(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> Any:
    """``module`` exported and lowered to ExecuTorch's XNNPACK delegate (``to_edge_transform_and_lower``)."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    program = torch.export.export(module, inputs, strict=False)
    return to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])


class Xnnpack(Backend):
    def run(self, module: nn.Module, inputs: tuple[Any, ...]) -> list[Any]:
        from executorch.runtime import Runtime

        program = lowered(module, inputs).to_executorch()
        method = Runtime.get().load_program(program.buffer).load_method("forward")
        return list(method.execute(list(inputs)))

    def census(self, module: nn.Module, inputs: tuple[Any, ...], onnx_path: str | None) -> dict[str, int]:
        """XNNPACK delegates and the ops left outside them, after ``to_edge_transform_and_lower``."""
        edge = lowered(module, tuple(inputs))
        ops: Counter[str] = Counter()
        for node in edge.exported_program().graph.nodes:
            if node.op != "call_function":
                continue
            schema = getattr(node.target, "_schema", None)  # an Edge op: aten::slice_copy
            name = str(schema.name).split("::")[-1] if schema is not None else getattr(node.target, "__name__", "")
            ops["delegate" if "call_delegate" in str(node.target) else name] += 1
        ops.pop("getitem", None)
        return dict(sorted(ops.items()))
