"""Verification: one comparison policy (:mod:`.policy`), numerical validation (:mod:`.validation`), ONNX export
(:mod:`.onnx_export`), the onnxruntime session factory (:mod:`.ort`) and the ONNX cross-check (:mod:`.cross_check`)."""

from __future__ import annotations

from fxsurgery.artifacts.onnx_export import export_onnx, op_histogram
from fxsurgery.verify.cross_check import cross_check
from fxsurgery.verify.policy import RTOL, SCALE_FLOOR, compare_outputs
from fxsurgery.verify.validation import random_inputs, validate

__all__ = [
    "cross_check",
    "export_onnx",
    "op_histogram",
    "RTOL",
    "SCALE_FLOOR",
    "compare_outputs",
    "random_inputs",
    "validate",
]
