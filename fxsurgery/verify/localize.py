"""Where a runtime first departs from torch, when the cross-check finds that it does.

* :func:`first_divergence`, for onnxruntime: the ONNX file is read back with a fresh ``torch.export`` of the same
  model, and ``torch.onnx.verification.verify_onnx_program(..., compare_intermediates=True)`` compares every
  intermediate value (matched by name, in graph order) between onnxruntime and torch; the first whose largest error
  exceeds the tolerance times the output's scale (the bound the outputs failed) is named. Files from the dynamo
  exporter only: the TorchScript exporter's value names match nothing.
* :func:`first_failing_node`, for the optional runtimes (OpenVINO, ExecuTorch), which convert the model themselves:
  the rewritten GraphModule is cut after one node (that node's value its only output), converted and run, and its
  value compared with torch's under the same policy; bisection over the graph's tensor values finds the first node
  the runtime computes wrong or cannot run, in about log2(values) conversions.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from fxsurgery.artifacts.onnx_export import torchlib_registry_once
from fxsurgery.engine.subgraph import label
from fxsurgery.errors import one_line, quiet_loggers
from fxsurgery.verify.policy import compare_leaves

__all__ = ["first_divergence", "first_failing_node", "cut_after"]


def first_divergence(module: nn.Module, inputs: tuple[torch.Tensor, ...], path: str | Path, bound: float) -> str:
    """One line: the first intermediate value of the ONNX file ``path`` (exported from ``module``) whose max abs
    error against torch exceeds ``bound``, or why none was found."""
    try:
        infos = _intermediates(module, inputs, path)
    except Exception as e:  # localizing is help on top of a failure: its own failure is said, not raised
        return f"could not localize it ({one_line(e)})"
    for info in infos:
        if info.max_abs_diff > bound:
            return (
                f"the first value over the bound is {info.name!r} (max abs error {info.max_abs_diff:.3g} > "
                f"{bound:.3g}), of {len(infos)} intermediate values compared in graph order"
            )
    return f"no intermediate value is over the bound {bound:.3g} ({len(infos)} compared): the outputs' own ops differ"


def _intermediates(module: nn.Module, inputs: tuple[torch.Tensor, ...], path: str | Path) -> list[Any]:
    import onnx_ir as ir
    from torch.onnx._internal.exporter._core import _prepare_exported_program_for_export
    from torch.onnx._internal.exporter._onnx_program import ONNXProgram
    from torch.onnx._internal.exporter._registration import ONNXRegistry
    from torch.onnx.verification import verify_onnx_program

    quiet = quiet_loggers("torch.onnx")  # it logs every value it compares
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), torchlib_registry_once(), quiet:
        warnings.simplefilter("ignore")
        program = torch.export.export(module, tuple(t.clone() for t in inputs), strict=False)
        # decomposed as the exporter decomposes it, so that the values are named as the file's are (a flatten that
        # becomes a view would otherwise take the name of a later view)
        program = _prepare_exported_program_for_export(program, registry=ONNXRegistry.from_torchlib())
        onnx_program = ONNXProgram(ir.load(str(path)), program)
        return list(
            verify_onnx_program(onnx_program, args=tuple(t.clone() for t in inputs), compare_intermediates=True)
        )


def cut_after(gm: fx.GraphModule, node: fx.Node, outputs: list[fx.Node]) -> fx.GraphModule:
    """The graph of ``gm`` up to ``node`` (every input kept), returning the values ``outputs`` (nodes up to it)."""
    graph, env = fx.Graph(), {}  # type: ignore[var-annotated]
    for n in gm.graph.nodes:
        if n.op == "output":
            break
        env[n] = graph.node_copy(n, lambda a: env[a])
        if n is node:
            break
    graph.output(tuple(env[o] for o in outputs))
    return fx.GraphModule(gm, graph)


def _values(gm: fx.GraphModule, inputs: tuple[torch.Tensor, ...]) -> dict[fx.Node, torch.Tensor]:
    """torch's value of every floating-point tensor node of ``gm`` on ``inputs``, in graph order."""
    values: dict[fx.Node, torch.Tensor] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            out = super().run_node(n)
            if n.op != "placeholder" and isinstance(out, torch.Tensor) and out.is_floating_point():
                values[n] = out.detach().clone()
            return out

    with torch.no_grad():
        Recorder(gm).run(*(t.clone() for t in inputs))
    return values


def _live(order: list[fx.Node], k: int, position: dict[fx.Node, int]) -> list[fx.Node]:
    """The values of ``order[:k + 1]`` still needed after ``order[k]``: read by a later node or by the output."""
    cut = position[order[k]]
    return [v for v in order[: k + 1] if any(u.op == "output" or position[u] > cut for u in v.users)]


def first_failing_node(
    run: Callable[[nn.Module, tuple[torch.Tensor, ...]], list[Any]],
    module: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    rtol: float | None = None,
) -> str:
    """One line: a node of ``module`` (a GraphModule) that ``run`` (a runtime: convert a module and run it, its
    outputs flat) computes wrong, or cannot run, from inputs it computes right.

    Cut after the k-th floating-point value, the graph returns the values still needed later (its live values),
    and the runtime's are compared with torch's under the policy. Bisection finds a k where they are wrong and were
    right at k - 1: the k-th node is wrong, and its inputs, live at k - 1, were right.
    """
    if not isinstance(module, fx.GraphModule):
        return f"could not localize it ({type(module).__name__} is not a torch.fx GraphModule)"
    try:
        values = _values(module, inputs)
    except Exception as e:
        return f"could not localize it (torch cannot run the graph node by node: {one_line(e)})"
    order, position = list(values), {n: i for i, n in enumerate(module.graph.nodes)}
    probes = 0

    def wrong(k: int) -> str:
        """What is wrong with the runtime's live values after the k-th value ("" when nothing)."""
        nonlocal probes
        probes += 1
        live = _live(order, k, position)
        if not live:  # only integers and shapes cross this cut: nothing to compare
            return ""
        try:
            got = run(cut_after(module, order[k], live), inputs)
        except Exception as e:
            return f"cannot run it: {one_line(e)}"
        if len(got) != len(live):
            return f"{len(got)} values for {len(live)}"
        failures = (compare_leaves([values[v]], [g], rtol=rtol, label=v.name).failure for v, g in zip(live, got))
        return next((f for f in failures if f), "")

    if not order or not (found := wrong(len(order) - 1)):
        return f"could not localize it: the graph's last values agree ({len(order)} values)"
    lo, hi = 0, len(order) - 1
    while lo < hi:  # wrong after hi; right after lo - 1 (nothing computed yet, for lo = 0)
        mid = (lo + hi) // 2
        verdict = wrong(mid)
        if verdict:
            hi, found = mid, verdict
        else:
            lo = mid + 1
    node = order[hi]
    return (
        f"the first node it computes wrong is {node.name!r} ({label(node, dict(module.named_modules()))}: "
        f"{found}), from inputs it computes right; bisection over {len(order)} values, {probes} conversions"
    )
