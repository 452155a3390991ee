"""The rewrites as graph passes over exported programs: ``torch.fx.passes.infra.pass_base.PassBase`` objects for
ATen graphs (``ExportedProgram.graph_module``) and ExecuTorch Edge graphs, e.g.::

    edge = to_edge_transform_and_lower(ep, transform_passes=[LinearToConvPass()], partitioner=[...])

Parameters stay graph inputs (placeholders): the passes add no parameter and copy none; the new kernels are views of
the originals computed in the graph (``view(W, (O, C, kh, kw))``), so the program's state dict is unchanged. Ops are
emitted in the dialect of the op they replace (``torch.ops.aten`` or ExecuTorch's ``exir_ops.edge.aten``), with
fake-tensor ``val`` and the replaced node's ``nn_module_stack`` and ``stack_trace``. ExecuTorch is not imported
unless the graph holds Edge ops.

* :class:`LinearToConvPass`: ``linear(x, W, b)`` (or its decomposition ``addmm(b, x, permute(W, [1, 0]))``) on
  ``x = view(m, (N, C*H*W))`` of a map ``m`` ``(N, C, H, W)`` is ``convolution(m, W.view(O, C, H, W), b)``
  viewed as ``(N, O)``; on any other 2-D ``x`` ``(N, C)`` it is a 1x1 convolution of ``x.view(N, C, 1, 1)``.
* :class:`ConvToLinearPass`: ``convolution(x, W, b)`` with a 1x1 kernel, stride 1, no padding, one group, on
  ``x`` ``(N, C, H, W)`` is ``addmm(b, permute(x).view(N*H*W, C), permute(W.view(O, C), [1, 0]))`` viewed as
  ``(N, H, W, O)`` and permuted back.

Without ExecuTorch, :func:`transform` runs passes on a copy of an ``ExportedProgram``.

Every candidate ends in ``sites`` (:class:`~fxsurgery.report.Site`): rewritten, or skipped with its reason. The
passes prove nothing themselves: check the program they return against the original (``ep.module()(x)``), or use
:func:`fxsurgery.linear_to_conv` on the ``ExportedProgram``, which validates.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from fxsurgery.report import Site

__all__ = ["LinearToConvPass", "ConvToLinearPass", "transform"]

#: The ATen-dialect op for each Edge op emitted (a view of a permuted value must copy: reshape).
_ATEN = {"view_copy": "reshape", "permute_copy": "permute"}
_STEP = ([1, 1], [0, 0], [1, 1], False, [0, 0], 1)  # stride, padding, dilation, transposed, output_padding, groups


def _name(target: Any) -> str:
    """``aten::linear`` for an ATen or Edge op overload, '' for anything else."""
    schema = getattr(target, "_schema", None)
    return str(schema.name) if schema is not None else ""


def _shape(node: Any) -> tuple[Any, ...] | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def _site_name(node: fx.Node) -> str:
    """The module path the op ran in (``nn_module_stack``), or the node name for a functional call."""
    stack = node.meta.get("nn_module_stack") or {}
    path = str(list(stack.values())[-1][0]) if stack else ""
    return path.replace("L['self'].", "").replace("L__self___", "") or node.name


class _Emitter:
    """Adds ops before ``at`` in the dialect of ``at``'s op, with fake values and ``at``'s metadata."""

    def __init__(self, graph: fx.Graph, at: fx.Node) -> None:
        self.graph, self.at = graph, at
        self.edge = type(at.target).__module__.startswith("executorch")
        vals = [n.meta.get("val") for n in graph.nodes if isinstance(n.meta.get("val"), torch.Tensor)]
        self.fake_mode = torch._guards.detect_fake_mode(vals)

    def op(self, name: str, *args: Any) -> fx.Node:
        if self.edge:
            from executorch.exir.dialects._ops import ops as exir_ops  # Edge only

            target = getattr(exir_ops.edge.aten, name).default
        else:
            target = getattr(torch.ops.aten, _ATEN.get(name, name)).default
        with self.graph.inserting_before(self.at):
            node = self.graph.call_function(target, args)
        for key in ("nn_module_stack", "stack_trace", "source_fn_stack"):
            if key in self.at.meta:
                node.meta[key] = self.at.meta[key]
        fake = fx.map_arg(args, lambda a: a.meta["val"])
        if self.fake_mode is not None:
            with self.fake_mode:
                node.meta["val"] = target(*fake)
        return node


class _OpPass(PassBase):
    pattern = ""

    def __init__(self, exclude: Sequence[str] = ()) -> None:
        super().__init__()
        self.exclude = set(exclude)
        self.sites: list[Site] = []

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        self.sites = []
        modified = False
        for node in list(graph_module.graph.nodes):
            found = self.candidate(node)
            if found is None:
                continue
            name = _site_name(node)
            reason = "excluded by the caller" if name in self.exclude else found(None)
            if reason:
                self.sites.append(Site(name, self.pattern, "skipped", reason))
                continue
            try:
                found(_Emitter(graph_module.graph, node))
            except Exception as e:  # the nodes added so far have no user: removed below; the op stays as it was
                self.sites.append(
                    Site(
                        name,
                        self.pattern,
                        "skipped",
                        f"internal error while rewriting ({type(e).__name__}: {e}); please report it",
                    )
                )
                modified = True
                continue
            self.sites.append(Site(name, self.pattern, "rewritten"))
            modified = True
        if modified:
            graph_module.graph.eliminate_dead_code()
            graph_module.graph.lint()
            graph_module.recompile()
        return PassResult(graph_module, modified)

    def candidate(self, node: fx.Node) -> Callable[[_Emitter | None], str] | None:
        """None when ``node`` is not a candidate; else a function that, given None, returns why it must be skipped
        ('' when it can be rewritten) and, given an emitter, rewrites it."""
        raise NotImplementedError


def _linear_parts(node: fx.Node) -> tuple[fx.Node, fx.Node, Any] | None:
    """``(x, W, b)`` of ``linear(x, W, b)``, ``addmm(b, x, permute(W, [1, 0]))`` or ``mm(x, permute(W, [1, 0]))``."""
    name = _name(node.target)
    if name == "aten::linear":
        x, w, b = (list(node.args) + [None])[:3]
        return (x, w, b) if isinstance(x, fx.Node) and isinstance(w, fx.Node) else None
    if name in ("aten::addmm", "aten::mm") and not node.kwargs:
        b, x, wt = (None, *node.args) if name == "aten::mm" else node.args
        if not isinstance(wt, fx.Node) or not isinstance(x, fx.Node) or not isinstance(wt.args[0], fx.Node):
            return None
        if (
            _name(wt.target) == "aten::t"
            or _name(wt.target) in ("aten::permute", "aten::permute_copy")
            and list(
                wt.args[1]  # type: ignore[arg-type]
            )
            == [1, 0]
        ):
            return x, wt.args[0], b
    return None


def _flattened_map(x: fx.Node) -> fx.Node | None:
    """``m`` when ``x`` is ``m`` ``(N, C, H, W)`` viewed as ``(N, C*H*W)``."""
    if _name(x.target) not in ("aten::view", "aten::view_copy", "aten::reshape", "aten::flatten", "aten::_unsafe_view"):
        return None
    m, shape, out = x.args[0], _shape(x.args[0]), _shape(x)
    if not isinstance(m, fx.Node) or shape is None or out is None or len(shape) != 4 or len(out) != 2:
        return None
    return m if out[0] == shape[0] and out[1] == shape[1] * shape[2] * shape[3] else None


class LinearToConvPass(_OpPass):
    """Linear -> Conv2d on an exported graph: HxW for a flattened map, 1x1 otherwise (see the module docstring)."""

    pattern = "linear->conv"

    def candidate(self, node: fx.Node) -> Callable[[_Emitter | None], str] | None:
        parts = _linear_parts(node)
        if parts is None:
            return None
        x, w, b = parts

        def rewrite(emit: _Emitter | None) -> str:
            x_shape, w_shape = _shape(x), _shape(w)
            if w.op not in ("placeholder", "get_attr"):
                return "the weight is computed in the graph, not a parameter"
            if x_shape is None or w_shape is None or len(x_shape) != 2 or len(w_shape) != 2:
                return f"input is {len(x_shape or ())}-D; only (N, C) inputs are rewritten by this pass"
            if any(not isinstance(d, int) for d in x_shape[1:] + w_shape):
                return "symbolic channel count"
            m = _flattened_map(x)
            kernel = [w_shape[0], *(_shape(m) or ())[1:]] if m is not None else [w_shape[0], w_shape[1], 1, 1]
            if emit is not None:
                src = m if m is not None else emit.op("view_copy", x, [-1, w_shape[1], 1, 1])
                y = emit.op("convolution", src, emit.op("view_copy", w, kernel), b, *_STEP)
                node.replace_all_uses_with(emit.op("view_copy", y, [-1, w_shape[0]]))
            return ""

        return rewrite


class ConvToLinearPass(_OpPass):
    """Pointwise Conv2d -> Linear (``addmm`` on channels-last rows) on an exported graph."""

    pattern = "conv->linear"

    def candidate(self, node: fx.Node) -> Callable[[_Emitter | None], str] | None:
        if _name(node.target) not in ("aten::convolution", "aten::conv2d"):
            return None
        args = list(node.args) + [None] * 9
        x, w, b = args[:3]
        if not isinstance(x, fx.Node) or not isinstance(w, fx.Node):
            return None
        step: tuple[Any, ...] = tuple(args[3:9])
        if _name(node.target) == "aten::conv2d":
            step = (args[3] or [1, 1], args[4] or [0, 0], args[5] or [1, 1], False, [0, 0], args[6] or 1)

        def rewrite(emit: _Emitter | None) -> str:
            x_shape, w_shape = _shape(x), _shape(w)
            if x_shape is None or w_shape is None or len(x_shape) != 4 or len(w_shape) != 4:
                return "not a 2-D convolution on an (N, C, H, W) map"
            if tuple(w_shape[2:]) != (1, 1):
                return f"kernel {w_shape[2]}x{w_shape[3]} is not pointwise"
            if [list(s) if isinstance(s, (list, tuple)) else s for s in step] != [
                list(s) if isinstance(s, tuple) else s for s in _STEP
            ]:
                return "stride, padding, dilation, groups or a transposed conv: not a plain pointwise conv"
            if w.op not in ("placeholder", "get_attr"):
                return "the weight is computed in the graph, not a parameter"
            if any(not isinstance(d, int) for d in x_shape[1:]):
                return "symbolic channels or spatial size"
            if emit is not None:
                o, c, h, wd = w_shape[0], w_shape[1], x_shape[2], x_shape[3]
                rows = emit.op("view_copy", emit.op("permute_copy", x, [0, 2, 3, 1]), [-1, c])
                wt = emit.op("permute_copy", emit.op("view_copy", w, [o, c]), [1, 0])
                y = emit.op("addmm", b, rows, wt) if b is not None else emit.op("mm", rows, wt)
                y = emit.op("permute_copy", emit.op("view_copy", y, [-1, h, wd, o]), [0, 3, 1, 2])
                node.replace_all_uses_with(y)
            return ""

        return rewrite


def transform(program: torch.export.ExportedProgram, *passes: PassBase) -> torch.export.ExportedProgram:
    """A new ``ExportedProgram``: ``passes`` run on a copy of ``program``'s graph (``program`` is left as it is);
    both programs share the weight tensors."""
    import copy

    tensors = [*program.state_dict.values(), *program.constants.values()]
    memo: dict[int, Any] = {id(t): t for t in tensors if isinstance(t, torch.Tensor)}
    return copy.deepcopy(program, memo)._transform_do_not_use(*passes)
