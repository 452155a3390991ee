"""OpenVINO's CPU plugin (optional: ``pip install "fxsurgery[openvino]"``), in float32 (it would pick bfloat16 on some
CPUs, 3e-3 from float32): the model converted by ``openvino.convert_model`` and compiled; run, timed, and its
execution graph counted."""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fxsurgery.runtimes.registry import Backend

__all__ = ["OpenVINO", "compiled"]


def compiled(
    module: nn.Module, inputs: tuple[torch.Tensor, ...], threads: int | None = None, save: Path | None = None
) -> Any:
    """``module`` converted by ``openvino.convert_model`` and compiled for the CPU plugin in float32 (with
    ``threads`` inference threads, or OpenVINO's default); with ``save``, the converted model written there as
    OpenVINO IR (``.xml`` and its ``.bin``, ``ov.save_model``)."""
    import openvino as ov

    with warnings.catch_warnings():  # it traces with torch.jit, which warns that it is deprecated
        warnings.simplefilter("ignore")
        model = ov.convert_model(module, example_input=inputs if len(inputs) > 1 else inputs[0])
    if save is not None:
        ov.save_model(model, str(save))
    config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "f32"}
    if threads is not None:
        config["INFERENCE_NUM_THREADS"] = threads
    return ov.Core().compile_model(model, "CPU", config)


class OpenVINO(Backend):
    def run(self, module: nn.Module, inputs: tuple[Any, ...]) -> list[Any]:
        model = compiled(module, inputs)
        result = model([t.numpy() for t in inputs])
        return [result[out] for out in model.outputs]

    def timer(self, module: nn.Module, inputs: tuple[Any, ...], workdir: Path, threads: int, exporter: str) -> Callable:
        request, feed = compiled(module, inputs, threads).create_infer_request(), [t.numpy() for t in inputs]
        return lambda: request.infer(feed)

    def census(
        self, module: nn.Module, inputs: tuple[Any, ...], onnx_path: str | None, save: Path | None = None
    ) -> dict[str, int]:
        """The layer types of OpenVINO's CPU execution graph (``f32`` inference precision); with ``save``, the IR."""
        model = compiled(module, tuple(inputs), save=save)
        ops = Counter(op.get_rt_info()["layerType"].astype(str) for op in model.get_runtime_model().get_ops())
        return dict(sorted((k, v) for k, v in ops.items() if k not in ("Input", "Output", "Const")))
