"""fxsurgery: graph surgery between Linear and Conv2d layers, validated numerically and cross-checked in
onnxruntime.

>>> res = fxsurgery.linear_to_conv(model, torch.randn(1, 3, 224, 224))
>>> print(res.summary())
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fxsurgery.api import check, conv_to_linear, linear_to_conv, rewrite
    from fxsurgery.artifacts.checkpoint import load_state_dict, original_state_dict
    from fxsurgery.artifacts.convert import convert_checkpoint
    from fxsurgery.artifacts.generation import generation_model
    from fxsurgery.engine.rule import Match, Rule, RuleSet, Skip
    from fxsurgery.errors import InputError, SurgeryError, TraceError, ValidationError
    from fxsurgery.options import Options
    from fxsurgery.report import CheckReport, Comparison, OnnxCheck, Site, SurgeryResult, Validation
    from fxsurgery.runtimes.bench import BenchReport, benchmark
    from fxsurgery.verify.cross_check import cross_check
    from fxsurgery.verify.policy import RTOL
    from fxsurgery.verify.validation import validate

#: Where each public name lives: imported on first use (PEP 562), so that ``fxsurgery --help`` and tools that only
#: need a submodule do not pay for importing torch.
_LAZY = {
    **dict.fromkeys(("check", "conv_to_linear", "linear_to_conv", "rewrite"), "fxsurgery.api"),
    **dict.fromkeys(("load_state_dict", "original_state_dict"), "fxsurgery.artifacts.checkpoint"),
    "convert_checkpoint": "fxsurgery.artifacts.convert",
    "generation_model": "fxsurgery.artifacts.generation",
    **dict.fromkeys(("Match", "Rule", "RuleSet", "Skip"), "fxsurgery.engine.rule"),
    **dict.fromkeys(("InputError", "SurgeryError", "TraceError", "ValidationError"), "fxsurgery.errors"),
    "Options": "fxsurgery.options",
    **dict.fromkeys(
        ("CheckReport", "Comparison", "OnnxCheck", "Site", "SurgeryResult", "Validation"), "fxsurgery.report"
    ),
    **dict.fromkeys(("BenchReport", "benchmark"), "fxsurgery.runtimes.bench"),
    "cross_check": "fxsurgery.verify.cross_check",
    "RTOL": "fxsurgery.verify.policy",
    "validate": "fxsurgery.verify.validation",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'fxsurgery' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = [
    "generation_model",
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
