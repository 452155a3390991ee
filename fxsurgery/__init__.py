"""fxsurgery: torch.fx graph surgery between Linear and Conv2d layers, validated numerically.

>>> res = fxsurgery.linear_to_conv(model, torch.randn(1, 3, 224, 224))
>>> print(res.summary())
"""

from __future__ import annotations

from fxsurgery.checkpoint import load_state_dict, original_state_dict
from fxsurgery.errors import InputError, SurgeryError, TraceError, ValidationError
from fxsurgery.onnx_check import Comparison, OnnxCheck, cross_check
from fxsurgery.pipeline import CheckReport, check
from fxsurgery.result import Site, SurgeryResult
from fxsurgery.surgery import conv_to_linear, linear_to_conv, rewrite
from fxsurgery.validation import RTOL, Validation, validate

__all__ = [
    "linear_to_conv",
    "conv_to_linear",
    "rewrite",
    "validate",
    "load_state_dict",
    "original_state_dict",
    "cross_check",
    "check",
    "OnnxCheck",
    "Comparison",
    "CheckReport",
    "Site",
    "SurgeryResult",
    "Validation",
    "RTOL",
    "SurgeryError",
    "TraceError",
    "ValidationError",
    "InputError",
]

__version__ = "0.1.0"
