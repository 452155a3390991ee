"""Where an ONNX file first departs from torch, when the cross-check finds that it does: the file is read back with a
fresh ``torch.export`` of the same model, and ``torch.onnx.verification.verify_onnx_program(...,
compare_intermediates=True)`` compares every intermediate value (matched by name, in graph order) between
onnxruntime and torch; the first whose largest error exceeds the tolerance times the output's scale (the bound the
outputs failed) is named. Files from the dynamo exporter only: the TorchScript exporter's value names match nothing.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fxsurgery.errors import one_line
from fxsurgery.verify.onnx_export import torchlib_registry_once

__all__ = ["first_divergence"]


def first_divergence(module: nn.Module, inputs: tuple[torch.Tensor, ...], path: str | Path, bound: float) -> str:
    """One line: the first intermediate value of the ONNX file ``path`` (exported from ``module``) whose max abs
    error against torch exceeds ``bound``, or why none was found."""
    try:
        infos = _intermediates(module, inputs, path)
    except Exception as e:  # localizing is help on top of a failure: its own failure is said, not raised
        return f"could not localize it ({one_line(e)})"
    for info in infos:
        if info.max_abs_diff > bound:
            return (f"the first value over the bound is {info.name!r} (max abs error {info.max_abs_diff:.3g} > "
                    f"{bound:.3g}), of {len(infos)} intermediate values compared in graph order")  # fmt: skip
    return f"no intermediate value is over the bound {bound:.3g} ({len(infos)} compared): the outputs' own ops differ"


def _intermediates(module: nn.Module, inputs: tuple[torch.Tensor, ...], path: str | Path) -> list[Any]:
    import onnx_ir as ir
    from torch.onnx._internal.exporter._onnx_program import ONNXProgram
    from torch.onnx.verification import verify_onnx_program

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), torchlib_registry_once():
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # it logs every value it compares
        program = torch.export.export(module, tuple(t.clone() for t in inputs), strict=False)
        onnx_program = ONNXProgram(ir.load(str(path)), program)
        return list(verify_onnx_program(onnx_program, args=tuple(t.clone() for t in inputs),
                                        compare_intermediates=True))  # fmt: skip
