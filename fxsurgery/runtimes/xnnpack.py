"""ExecuTorch with XNNPACK (optional: ``pip install "fxsurgery[executorch]"``): the model exported and lowered with
``to_edge_transform_and_lower``; run by ExecuTorch's pybindings, and its delegates and the ops left outside them
counted."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fxsurgery.runtimes.registry import Backend

__all__ = ["Xnnpack", "lowered", "execute"]


def lowered(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> Any:
    """``module`` exported and lowered to ExecuTorch's XNNPACK delegate (``to_edge_transform_and_lower``)."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    program = torch.export.export(module, inputs, strict=False)
    return to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])


def execute(pte: bytes, inputs: tuple[Any, ...] | list[Any]) -> list[Any]:
    """The ``.pte`` bytes ``pte`` loaded by ExecuTorch's pybindings and run once on ``inputs``: its outputs, copied.
    The bytes, the program and the method are all held until the outputs are copied: the runtime borrows each
    (pytorch/executorch#10725: a temporary ``bytes`` or ``Program`` is freed under it, and a later run reads
    garbage: "Attempted to resize a static tensor")."""
    from executorch.runtime import Runtime

    program = Runtime.get().load_program(pte)
    method = program.load_method("forward")
    outputs = [t.clone() if isinstance(t, torch.Tensor) else t for t in method.execute(list(inputs))]
    del method, program
    return outputs


class Xnnpack(Backend):
    def run(self, module: nn.Module, inputs: tuple[Any, ...]) -> list[Any]:
        return execute(lowered(module, inputs).to_executorch().buffer, inputs)

    def census(
        self, module: nn.Module, inputs: tuple[Any, ...], onnx_path: str | None, save: Path | None = None
    ) -> dict[str, int]:
        """XNNPACK delegates and the ops left outside them, after ``to_edge_transform_and_lower``; with ``save``,
        the ``.pte`` ExecuTorch runs, written there."""
        edge = lowered(module, tuple(inputs))
        if save is not None:
            save.write_bytes(edge.to_executorch().buffer)
        ops: Counter[str] = Counter()
        for node in edge.exported_program().graph.nodes:
            if node.op != "call_function":
                continue
            schema = getattr(node.target, "_schema", None)  # an Edge op: aten::slice_copy
            name = str(schema.name).split("::")[-1] if schema is not None else getattr(node.target, "__name__", "")
            ops["delegate" if "call_delegate" in str(node.target) else name] += 1
        ops.pop("getitem", None)
        return dict(sorted(ops.items()))
