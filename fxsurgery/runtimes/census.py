"""The op census after a deployment target's own conversion (:mod:`fxsurgery.plan.targets`): what onnxruntime runs
after its graph optimizations, the MIL ops coremltools makes, OpenVINO's CPU execution graph, ExecuTorch's XNNPACK
delegates and the ops left outside them. Each toolchain is optional: without it the census says so."""

from __future__ import annotations

import importlib.util
import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from fxsurgery.capture.copies import eval_copy
from fxsurgery.errors import one_line
from fxsurgery.plan.targets import TARGETS
from fxsurgery.runtimes.runners import openvino_compiled, xnnpack_lowered

__all__ = ["census"]


def census(
    name: str,
    original: nn.Module,
    rewritten: nn.Module,
    inputs: tuple[Any, ...],
    onnx_paths: tuple[str, str] | None = None,
) -> dict[str, Any]:
    """The ops of both models after the target's own conversion, ``{"toolchain", "original", "rewritten"}``; where
    the toolchain is not installed or fails, ``{"toolchain", "skipped": why}``."""
    t = TARGETS[name]
    if importlib.util.find_spec(t.toolchain) is None:
        return {
            "toolchain": t.toolchain,
            "skipped": f'{t.toolchain} is not installed: pip install "fxsurgery[{t.extra}]"',
        }
    count: Callable[[nn.Module, tuple[Any, ...], str | None], dict[str, int]] = _CENSUS[name]
    paths = onnx_paths or (None, None)
    out: dict[str, Any] = {"toolchain": t.toolchain}
    try:
        for label, module, path in (("original", original, paths[0]), ("rewritten", rewritten, paths[1])):
            out[label] = count(eval_copy(module), inputs, path)  # a copy in eval mode: the user's flags stay
    except Exception as e:  # a census says what the toolchain made of the model; its failure is reported, not fatal
        return {"toolchain": t.toolchain, "skipped": f"{t.toolchain} failed: {one_line(e)}"}
    return out


def _onnxruntime(module: nn.Module, inputs: tuple[Any, ...], path: str | None) -> dict[str, int]:
    """The op histogram of the graph onnxruntime runs after its own optimizations (extended level, saved)."""
    import onnxruntime as ort

    from fxsurgery.artifacts.onnx_export import export_onnx, op_histogram

    with tempfile.TemporaryDirectory(prefix="fxsurgery-census-") as tmp:
        if path is None:
            path = f"{tmp}/model.onnx"
            export_onnx(module, inputs, Path(path))
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.optimized_model_filepath = f"{tmp}/optimized.onnx"
        ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        return op_histogram(so.optimized_model_filepath)


def _coreml(module: nn.Module, inputs: tuple[Any, ...], path: str | None) -> dict[str, int]:
    from fxsurgery.runtimes.coreml import op_census

    return op_census(module, inputs)


def _openvino(module: nn.Module, inputs: tuple[Any, ...], path: str | None) -> dict[str, int]:
    """The layer types of OpenVINO's CPU execution graph (``f32`` inference precision)."""
    compiled = openvino_compiled(module, tuple(inputs))
    ops = Counter(op.get_rt_info()["layerType"].astype(str) for op in compiled.get_runtime_model().get_ops())
    return dict(sorted((k, v) for k, v in ops.items() if k not in ("Input", "Output", "Const")))


def _executorch(module: nn.Module, inputs: tuple[Any, ...], path: str | None) -> dict[str, int]:
    """XNNPACK delegates and the ops left outside them, after ``to_edge_transform_and_lower``."""
    edge = xnnpack_lowered(module, tuple(inputs))
    ops: Counter[str] = Counter()
    for node in edge.exported_program().graph.nodes:
        if node.op != "call_function":
            continue
        schema = getattr(node.target, "_schema", None)  # an Edge op: aten::slice_copy
        name = str(schema.name).split("::")[-1] if schema is not None else getattr(node.target, "__name__", "")
        ops["delegate" if "call_delegate" in str(node.target) else name] += 1
    ops.pop("getitem", None)
    return dict(sorted(ops.items()))


_CENSUS: dict[str, Callable[[nn.Module, tuple[Any, ...], str | None], dict[str, int]]] = {
    "onnxruntime": _onnxruntime,
    "coreml": _coreml,
    "openvino": _openvino,
    "executorch-xnnpack": _executorch,
}
