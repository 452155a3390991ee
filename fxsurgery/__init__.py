"""fxsurgery: graph surgery between Linear and Conv2d layers, validated numerically and cross-checked in
onnxruntime.

>>> res = fxsurgery.linear_to_conv(model, torch.randn(1, 3, 224, 224))
>>> print(res.summary())
"""

from __future__ import annotations

from fxsurgery.api import check, conv_to_linear, linear_to_conv, rewrite
from fxsurgery.artifacts.checkpoint import load_state_dict, original_state_dict
from fxsurgery.artifacts.convert import convert_checkpoint
from fxsurgery.engine.rule import Match, Rule, RuleSet, Skip
from fxsurgery.errors import InputError, SurgeryError, TraceError, ValidationError
from fxsurgery.options import Options
from fxsurgery.report import CheckReport, Comparison, OnnxCheck, Site, SurgeryResult, Validation
from fxsurgery.runtimes.bench import BenchReport, benchmark
from fxsurgery.verify.cross_check import cross_check
from fxsurgery.verify.policy import RTOL
from fxsurgery.verify.validation import validate

__all__ = [
    "linear_to_conv",
    "conv_to_linear",
    "rewrite",
    "check",
    "benchmark",
    "BenchReport",
    "Options",
    "validate",
    "cross_check",
    "load_state_dict",
    "original_state_dict",
    "convert_checkpoint",
    "Rule",
    "RuleSet",
    "Match",
    "Skip",
    "Site",
    "SurgeryResult",
    "Validation",
    "OnnxCheck",
    "Comparison",
    "CheckReport",
    "RTOL",
    "SurgeryError",
    "TraceError",
    "ValidationError",
    "InputError",
]

__version__ = "0.1.0"
