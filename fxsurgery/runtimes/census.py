"""The op census after a deployment target's own conversion (:mod:`fxsurgery.plan.targets`), by its runtime's
``census`` (:mod:`fxsurgery.runtimes.registry`): what onnxruntime runs after its graph optimizations, the MIL ops
coremltools makes, OpenVINO's CPU execution graph, ExecuTorch's XNNPACK delegates and the ops left outside them.
Each toolchain is optional: without it the census says so."""

from __future__ import annotations

from typing import Any

from torch import nn

from fxsurgery.capture.copies import eval_copy
from fxsurgery.errors import one_line
from fxsurgery.runtimes.registry import of_target

__all__ = ["census"]


def census(
    name: str,
    original: nn.Module,
    rewritten: nn.Module,
    inputs: tuple[Any, ...],
    onnx_paths: tuple[str, str] | None = None,
) -> dict[str, Any]:
    """The ops of both models after the target ``name``'s own conversion, ``{"toolchain", "original",
    "rewritten"}``; where the toolchain is not installed or fails, ``{"toolchain", "skipped": why}``."""
    runtime = of_target(name)
    toolchain = runtime.package
    if not runtime.available():
        return {"toolchain": toolchain, "skipped": f"{toolchain} is not installed: {runtime.install_hint()}"}
    backend = runtime.impl()
    paths = onnx_paths or (None, None)
    out: dict[str, Any] = {"toolchain": toolchain}
    try:
        for label, module, path in (("original", original, paths[0]), ("rewritten", rewritten, paths[1])):
            out[label] = backend.census(eval_copy(module), inputs, path)  # a copy in eval mode: the user's flags stay
    except Exception as e:  # a census says what the toolchain made of the model; its failure is reported, not fatal
        return {"toolchain": toolchain, "skipped": f"{toolchain} failed: {one_line(e)}"}
    return out
