"""Core ML's view of a graph (optional: ``pip install "fxsurgery[coreml]"``): coremltools converts the model, as a
Core ML deployment would (on Linux it converts but cannot run), and :func:`op_census` counts the ops of the MIL
program it makes: whether a rewrite survives that conversion (convs stay convs, no transpose comes back)."""

from __future__ import annotations

import contextlib
import io
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fxsurgery.errors import InputError, SurgeryError, full_text, quiet_loggers
from fxsurgery.runtimes.registry import Backend

__all__ = ["op_census", "CoreML"]


def op_census(model: nn.Module, example_inputs: tuple[Any, ...], save: Path | None = None) -> dict[str, int]:
    """The MIL ops (constants left out) of ``model`` converted by coremltools from ``torch.export`` (an ML
    program, the format of current Apple devices), by op type; with ``save``, the ``.mlpackage`` of that conversion
    written there."""
    try:
        import coremltools as ct
    except ImportError as e:
        raise InputError('the Core ML op census needs coremltools: pip install "fxsurgery[coreml]"') from e
    try:
        program = torch.export.export(model, tuple(example_inputs), strict=False).run_decompositions({})
        with contextlib.redirect_stderr(io.StringIO()), quiet_loggers("coremltools"):  # its progress bars
            if save is None:
                mil = ct.convert(program, convert_to="milinternal")
            else:  # the package, and the MIL program it was made from (the same passes ran on it)
                package = ct.convert(program, convert_to="mlprogram")
                package.save(str(save))
                mil = package._mil_program
    except Exception as e:
        raise SurgeryError(f"coremltools cannot convert {type(model).__name__}: {full_text(e)}") from e
    ops = Counter(op.op_type for f in mil.functions.values() for op in f.operations if op.op_type != "const")
    return dict(sorted(ops.items()))


class CoreML(Backend):
    def census(
        self, module: nn.Module, inputs: tuple[Any, ...], onnx_path: str | None, save: Path | None = None
    ) -> dict[str, int]:
        return op_census(module, inputs, save)
