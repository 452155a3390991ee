"""Small node builders rules share, and the emitter of ops in an exported graph's own dialect (ATen, or ExecuTorch's
Edge)."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
from torch import nn

from fxsurgery import _runtime
from fxsurgery.engine import provenance
from fxsurgery.engine.nodes import writes_in_place
from fxsurgery.engine.rule import Skip

__all__ = ["guard", "replay", "check_replayable", "DialectEmitter", "op_name", "val_shape"]


def guard(
    graph: fx.Graph,
    x: fx.Node,
    spatial: tuple[int, ...],
    site: str,
    original_rejects: bool,
    features: int | None = None,
) -> fx.Node:
    """Insert a run-time check that ``x`` still has the traced spatial size (:func:`~fxsurgery._runtime.
    check_spatial_size`); returns ``x`` through it."""
    args = (x, spatial, site, original_rejects) + ((features,) if features is not None else ())
    return graph.call_function(_runtime.check_spatial_size, args)


def check_replayable(ops: list[tuple[fx.Node, fx.Node]], source: fx.Node, modules: dict[str, nn.Module]) -> None:
    """Ops that write in place may run on ``source`` instead only where nothing else can see the write: in the
    original they wrote to a reshape of it, which is a copy or a view depending on its memory layout at run time."""
    writer = next((op for op, _ in ops if writes_in_place(op, modules)), None)
    if writer is None:
        return
    first = ops[0][0]
    shared = source.op == "placeholder" or any(u is not first and not _on_path(u, first) for u in source.users)
    if shared:
        raise Skip(
            f"{writer.name} writes in place between the map and the Linear; whether the original's write "
            "reaches the map depends on its memory layout, so the rewrite is left out"
        )


def _on_path(user: fx.Node, first: fx.Node) -> bool:
    """``user`` is a reshape on the way from the map to the first op (the flatten itself)."""
    frontier = [user]
    for _ in range(8):
        if first in frontier:
            return True
        frontier = [u for n in frontier for u in n.users]
    return False


def replay(graph: fx.Graph, ops: list[tuple[fx.Node, fx.Node]], src: fx.Node) -> fx.Node:
    """Apply the elementwise ``ops`` (each with its tensor input) to ``src`` instead, in order."""
    for op, op_input in ops:
        src = graph.node_copy(op, lambda a, prev=src, old=op_input: prev if a is old else a)  # type: ignore[misc]
        src.meta = provenance.of(op)
    return src


#: The ATen-dialect op for each Edge op emitted (a view of a permuted value must copy: reshape).
_ATEN = {"view_copy": "reshape", "permute_copy": "permute"}


def op_name(target: Any) -> str:
    """``aten::linear`` for an ATen or Edge op overload, '' for anything else."""
    schema = getattr(target, "_schema", None)
    return str(schema.name) if schema is not None else ""


def val_shape(node: Any) -> tuple[Any, ...] | None:
    """The shape of an exported graph's value (``meta["val"]``), or None."""
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def _emitted_before(target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> fx.Node | None:
    """The node an earlier site emitted for the same op on the same arguments (q, k and v read one value: its rows
    are made once), or None. Ops that write in place are never shared, nor dequantizes (each quantized op owns its
    own, as PT2E makes them)."""
    schema = getattr(target, "_schema", None)
    first = next((a for a in args if isinstance(a, fx.Node)), None)
    if first is None or schema is None or schema.is_mutable or not str(schema.name).startswith("aten::"):
        return None
    for user in first.users:
        if provenance.REPLACES in user.meta and user.target == target and user.args == args and user.kwargs == kwargs:
            return user
    return None


class DialectEmitter:
    """Adds ops before ``at`` in the dialect of ``at``'s op (``torch.ops.aten`` or ExecuTorch's ``exir_ops.edge.aten``:
        ExecuTorch is imported only for an Edge graph), with fake-tensor values and ``at``'s ``source_fn_stack`` (the
    engine gives every new node the ``nn_module_stack`` and ``stack_trace`` of the node it replaces)."""

    def __init__(self, graph: fx.Graph, at: fx.Node) -> None:
        self.graph, self.at = graph, at
        self.edge = type(at.target).__module__.startswith("executorch")
        vals = [n.meta.get("val") for n in graph.nodes if isinstance(n.meta.get("val"), torch.Tensor)]
        self.fake_mode = torch._guards.detect_fake_mode(vals)

    def copy(self, node: fx.Node, replace: dict[int, Any]) -> fx.Node:
        """``node``'s op again (in its own dialect and namespace, with its keywords), its positional arguments at the
        indices of ``replace`` replaced: a quantize or dequantize re-applied to a reshaped tensor."""
        args = tuple(replace.get(i, a) for i, a in enumerate(node.args))
        return self._add(node.target, args, dict(node.kwargs))

    def contiguous(self, x: fx.Node) -> fx.Node:
        """``x`` copied to contiguous memory (ExecuTorch lowers every view as a view in place, which a tensor whose
        memory is permuted does not allow; its Edge tensors are contiguous already: a plain clone there)."""
        if self.edge:
            return self.op("clone", x)
        return self._add(torch.ops.aten.clone.default, (x,), {"memory_format": torch.contiguous_format})

    def op(self, name: str, *args: Any) -> fx.Node:
        if self.edge:
            from executorch.exir.dialects._ops import ops as exir_ops  # Edge only

            target = getattr(exir_ops.edge.aten, name).default
        else:
            target = getattr(torch.ops.aten, _ATEN.get(name, name)).default
        return self._add(target, args, {})

    def _add(self, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> fx.Node:
        same = _emitted_before(target, args, kwargs)
        if same is not None:
            return same
        with self.graph.inserting_before(self.at):
            node = self.graph.call_function(target, args, kwargs)
        if "source_fn_stack" in self.at.meta:  # (nn_module_stack and stack_trace: the engine's provenance)
            node.meta["source_fn_stack"] = self.at.meta["source_fn_stack"]
        fake, fake_kw = fx.map_arg((args, kwargs), lambda a: a.meta["val"])
        if self.fake_mode is not None:
            with self.fake_mode:
                node.meta["val"] = target(*fake, **fake_kw)
        return node
