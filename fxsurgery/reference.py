"""What a rewrite is validated against, and what validation cannot run: the model itself, or for a float64 proof
of an exported graph, the graph torch.export captured (once it is shown to match the model)."""

from __future__ import annotations

import dataclasses

import torch
import torch.fx as fx
from torch import nn

from fxsurgery import _runtime
from fxsurgery.errors import InputError, ValidationError
from fxsurgery.options import Options
from fxsurgery.report import SurgeryResult
from fxsurgery.verify.validation import validate

__all__ = ["validation_reference", "check_mode_for_validation", "CAPTURED_NOTE"]

CAPTURED_NOTE = ("float64 proof against the graph torch.export captured (its dtype casts are the export's, so the "
                  "model itself would differ in float64 wherever it casts to its own dtype); that graph matches the "
                  "model in native precision")  # fmt: skip


def validation_reference(model: nn.Module, captured: nn.Module | None, inputs: tuple[torch.Tensor, ...],
                         options: Options, result: SurgeryResult) -> nn.Module:  # fmt: skip
    """What the rewrite is proved against: the model, or, for a float64 proof of an exported graph, the captured
    graph before any rewrite (its casts to the export's dtype would otherwise count as error), once that graph is
    shown to match the model in native precision."""
    if captured is None or options.precision != "float64":
        return model
    faithful = validate(model, captured, inputs, num_random=options.num_random, precision="native", seed=options.seed)
    if not faithful:
        raise ValidationError(f"validation failed: the graph torch.export captured differs from the model "
                              f"({faithful.failure}; no site is responsible): try frontend='fx', and please report "
                              "the model", result=dataclasses.replace(result, validation=faithful))  # fmt: skip
    return captured


def check_mode_for_validation(model: nn.Module, gm: nn.Module) -> None:
    """A training-mode model whose forward branches on ``self.training`` is rewritten in training mode, which the
    eval-mode validation cannot run: say so instead of blaming a site."""
    if not model.training:
        return
    branching = sorted({name for m in gm.modules() if isinstance(m, fx.GraphModule) for n in m.graph.nodes
                        if n.target is _runtime.check_mode for name in n.args[2]})
    if branching:
        raise InputError(f"the model is in training mode and the forward of {', '.join(branching)} branches on "
                         "self.training: the rewritten graph holds the training-mode branch, which validation (on "
                         "eval-mode copies) cannot run; call model.eval() before the rewrite, or pass "
                         "validate=False")  # fmt: skip
