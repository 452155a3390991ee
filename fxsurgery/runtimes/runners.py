"""More runtimes for the cross-check (optional extras): OpenVINO's CPU plugin (``pip install "fxsurgery[openvino]"``,
in float32: it would pick bfloat16 on some CPUs, 3e-3 from float32) and ExecuTorch with XNNPACK (``pip install
"fxsurgery[executorch]"``: the model lowered with ``to_edge_transform_and_lower`` and run by its pybindings). Each
runner converts a model for one batch of inputs and returns its outputs as a flat list."""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from fxsurgery.errors import InputError

__all__ = ["RUNNERS", "check_runtimes", "run", "openvino_compiled", "xnnpack_lowered"]

#: runtime -> (the package it needs, the extra that installs it, the label of its outputs)
RUNNERS: dict[str, tuple[str, str, str]] = {
    "openvino": ("openvino", "openvino", "OpenVINO"),
    "executorch": ("executorch", "executorch", "ExecuTorch-XNNPACK"),
}


def check_runtimes(runtimes: Sequence[str]) -> None:
    for rt in runtimes:
        if rt not in RUNNERS:
            raise InputError(f"unknown cross-check runtime {rt!r}: use some of {', '.join(RUNNERS)}")
        package, extra, _ = RUNNERS[rt]
        if importlib.util.find_spec(package) is None:
            raise InputError(f'the {rt} cross-check needs {package}: pip install "fxsurgery[{extra}]"')


def run(runtime: str, module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> list[Any]:
    """``module`` (in eval mode) converted for ``runtime`` and run once on ``inputs``: its outputs, flat."""
    runner: Callable[[nn.Module, tuple[torch.Tensor, ...]], list[Any]] = {
        "openvino": _openvino,
        "executorch": _executorch,
    }[runtime]
    return runner(module, tuple(t.clone() for t in inputs))


def openvino_compiled(module: nn.Module, inputs: tuple[torch.Tensor, ...], threads: int | None = None) -> Any:
    """``module`` converted by ``openvino.convert_model`` and compiled for the CPU plugin in float32 (with
    ``threads`` inference threads, or OpenVINO's default)."""
    import openvino as ov

    with warnings.catch_warnings():  # it traces with torch.jit, which warns that it is deprecated
        warnings.simplefilter("ignore")
        model = ov.convert_model(module, example_input=inputs if len(inputs) > 1 else inputs[0])
    config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "f32"}
    if threads is not None:
        config["INFERENCE_NUM_THREADS"] = threads
    return ov.Core().compile_model(model, "CPU", config)


def xnnpack_lowered(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> Any:
    """``module`` exported and lowered to ExecuTorch's XNNPACK delegate (``to_edge_transform_and_lower``)."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    program = torch.export.export(module, inputs, strict=False)
    return to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])


def _openvino(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> list[Any]:
    compiled = openvino_compiled(module, inputs)
    result = compiled([t.numpy() for t in inputs])
    return [result[out] for out in compiled.outputs]


def _executorch(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> list[Any]:
    from executorch.runtime import Runtime

    lowered = xnnpack_lowered(module, inputs).to_executorch()
    method = Runtime.get().load_program(lowered.buffer).load_method("forward")
    return list(method.execute(list(inputs)))
