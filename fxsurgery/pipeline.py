"""One call for the whole job: rewrite, validate, export both versions and cross-check them in onnxruntime."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from torch import nn

from fxsurgery.errors import ValidationError
from fxsurgery.onnx_check import OnnxCheck, cross_check
from fxsurgery.result import SurgeryResult
from fxsurgery.surgery import rewrite
from fxsurgery.tracing import normalize_inputs

__all__ = ["CheckReport", "check"]


@dataclass(frozen=True)
class CheckReport:
    """A :class:`SurgeryResult` and the :class:`OnnxCheck` of the same rewrite; truthy when both passed."""

    surgery: SurgeryResult
    onnx: OnnxCheck | None

    @property
    def passed(self) -> bool:
        return self.surgery.passed and (self.onnx is None or self.onnx.passed)

    def __bool__(self) -> bool:
        return self.passed

    def summary(self) -> str:
        parts = [self.surgery.summary()]
        parts.append(self.onnx.summary() if self.onnx is not None else "ONNX cross-check: not run")
        parts.append(f"overall: {'PASSED' if self.passed else 'FAILED'}")
        return "\n\n".join(parts)

    def to_dict(self) -> dict[str, Any]:
        d = self.surgery.to_dict()
        return {
            "passed": self.passed,
            "direction": d["direction"],
            "sites": d["sites"],
            "notes": d["notes"],
            "validation": d["validation"],
            "onnx": None if self.onnx is None else self.onnx.to_dict(),
        }


def check(
    model: nn.Module,
    example_inputs: Any,
    to: str = "conv",
    out_dir: str | os.PathLike = "fxsurgery-out",
    *,
    exporter: str = "dynamo",
    onnx: bool = True,
    **rewrite_kwargs: Any,
) -> CheckReport:
    """Rewrite ``model`` towards ``to`` (``"conv"`` or ``"linear"``), validate, and cross-check in onnxruntime.

    A validation mismatch does not stop the export: the report carries both results and ``passed`` is False.
    """
    inputs = normalize_inputs(example_inputs)
    try:
        result = rewrite(model, inputs, to, **rewrite_kwargs)
    except ValidationError as e:
        result = e.result
    onnx_check = None
    if onnx:
        onnx_check = cross_check(model, result.module, inputs, out_dir, exporter=exporter,
                                 direction=result.direction, rewritten_sites=len(result.rewritten))  # fmt: skip
    return CheckReport(result, onnx_check)
