"""Quantized models as the pipeline meets them: a graph PT2E (``convert_pt2e``) or torchao quantized, which is
rewritten as the exported graph it is; a model prepared but not converted (observers, fake-quant), which is refused
with what to do."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
from torch import nn

from fxsurgery.errors import InputError

__all__ = ["quantized_program", "refuse_observers"]

_OBSERVERS = ("ObserverBase", "FakeQuantizeBase")


def quantized_program(model: Any) -> nn.Module | torch.export.ExportedProgram | None:
    """``model`` when it is or holds a quantized graph (an ExportedProgram, or a GraphModule anywhere in the model,
    holding quantize/dequantize ops), else None."""
    from fxsurgery.rules.aten.qdq import holds_quantized_ops  # (capture comes before the rules: imported on use)

    if isinstance(model, torch.export.ExportedProgram):
        return model if holds_quantized_ops(model.graph) else None
    if isinstance(model, nn.Module) and any(
        isinstance(m, fx.GraphModule) and holds_quantized_ops(m.graph) for m in model.modules()
    ):
        return model
    return None


def refuse_observers(model: nn.Module) -> None:
    """Refuse a graph prepared for quantization (PT2E's ``prepare_pt2e``/``prepare_qat_pt2e``) and not converted: its
    observers (or QAT's fake-quant) change with every forward, so no rewrite of it can be validated, and it is not
    what runs on the device. (Eager-mode QAT layers, ``torch.ao.nn.qat.Linear``, are subclasses the rules skip.)"""
    if not isinstance(model, fx.GraphModule):
        return
    for name, m in model.named_modules():
        kinds = {c.__name__ for c in type(m).__mro__}
        if kinds & set(_OBSERVERS):
            kind = "fake-quant (QAT)" if "FakeQuantizeBase" in kinds else "an observer"
            raise InputError(
                f"the model holds {kind} at {name or 'the root'} ({type(m).__name__}): it is prepared for "
                "quantization, not converted, and its observers update on every forward. Quantize, then rewrite: "
                "calibrate (or train) and call convert_pt2e first, then rewrite the converted model; or rewrite "
                "the float model before prepare_pt2e (see docs/quantization.md)"
            )
