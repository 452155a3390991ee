"""What a rewrite is validated against, and what validation cannot run: the model itself, or for a float64 proof
of an exported graph, the graph torch.export captured (once it is shown to match the model)."""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx
from torch import nn

from fxsurgery import _runtime
from fxsurgery.capture import eval_copy, lowest_batch, on_meta, working_copy
from fxsurgery.errors import InputError, ValidationError
from fxsurgery.report import SurgeryResult
from fxsurgery.verify.policy import compare_outputs
from fxsurgery.verify.validation import kept_state, random_inputs, run_no_grad, validate

if TYPE_CHECKING:
    from fxsurgery.options import Options

log = logging.getLogger(__name__)

__all__ = [
    "validation_reference",
    "check_mode_for_validation",
    "CAPTURED_NOTE",
    "batch_one_admitted",
    "validated",
    "refuse_random",
]

CAPTURED_NOTE = (
    "float64 proof against the graph torch.export captured (its casts to the model's dtype are constants of the "
    "graph: in both graphs they cast to float64), and that graph matches the model in native precision"
)


def validation_reference(
    model: nn.Module,
    captured: nn.Module | None,
    inputs: tuple[torch.Tensor, ...],
    options: Options,
    result: SurgeryResult,
) -> nn.Module:
    """What the rewrite is proved against: the model, or, for a float64 proof of an exported graph, the captured
    graph before any rewrite (its casts to the export's dtype would otherwise count as error), once that graph is
    shown to match the model in native precision."""
    if captured is None or options.precision != "float64":
        return model
    faithful = validate(model, captured, inputs, num_random=options.num_random, precision="native", seed=options.seed)
    if not faithful:
        refuse_random(model, inputs)
        raise ValidationError(
            f"validation failed: the graph torch.export captured differs from the model "
            f"({faithful.failure}; no site is responsible): try frontend='fx', and please report "
            "the model",
            result=dataclasses.replace(result, validation=faithful),
        )
    return captured


def check_mode_for_validation(model: nn.Module, gm: nn.Module) -> None:
    """A training-mode model whose forward branches on ``self.training`` is rewritten in training mode, which the
    eval-mode validation cannot run: say so instead of blaming a site."""
    if not model.training:
        return
    branching = sorted(
        {
            name
            for m in gm.modules()
            if isinstance(m, fx.GraphModule)
            for n in m.graph.nodes
            if n.target is _runtime.check_mode
            for name in n.args[2]
        }
    )
    if branching:
        raise InputError(
            f"the model is in training mode and the forward of {', '.join(branching)} branches on "
            "self.training: the rewritten graph holds the training-mode branch, which validation (on "
            "eval-mode copies) cannot run; call model.eval() before the rewrite, or pass "
            "validate=False"
        )


def batch_one_admitted(
    model: nn.Module, program: torch.export.ExportedProgram, inputs: tuple[torch.Tensor, ...]
) -> bool:
    """Whether the graph torch.export traced at a batch of 2 or more also stands for batch 1 (and 0).

    torch.export gives a dynamic batch the range [2, inf) and records no guard for a forward that branches on the
    batch being 1 (``y.softmax(-1) if y.shape[0] == 1 else y``), so its program runs batch 1 through the other
    branch. Where the program's range starts at 2, the model and the program run once on a batch-1 input like the
    example (copies: nothing of the user's moves) and must agree under the tolerance policy; a model that cannot be
    run here (meta device, training mode) keeps torch.export's own behaviour."""
    if lowest_batch(program) != 2 or model.training or not inputs or not inputs[0].dim() or on_meta(model, inputs):
        return True
    one = random_inputs(inputs, torch.Generator().manual_seed(0), batch=1)
    exported = program.module()
    try:
        with kept_state(exported):
            ref, got = run_no_grad(working_copy(model).eval(), one), run_no_grad(exported, one)
    except Exception:
        return False  # the model or its graph cannot run batch 1: refused, with the guard's clear error
    return not compare_outputs(ref, got).failure


def validated(
    model: nn.Module, captured: Any, inputs: tuple[torch.Tensor, ...], options: Options, result: SurgeryResult
) -> tuple[SurgeryResult, nn.Module]:
    """``result`` with its validation against ``model`` (or, for a float64 proof of an export, the graph torch.export
    captured, once it is shown to match the model), and the eval-mode copy it was compared with."""
    check_mode_for_validation(model, result.module)
    log.info("validating %d rewritten sites", len(result.rewritten))
    reference = validation_reference(model, captured, inputs, options, result)
    original = eval_copy(reference, options.precision)
    check = validate(
        reference,
        result.module,
        inputs,
        num_random=options.num_random,
        precision=options.precision,
        rtol=options.rtol,
        seed=options.seed,
        original_copy=original,
    )
    if not check:
        refuse_random(model, inputs)
    if reference is not model:
        check = dataclasses.replace(check, notes=(*check.notes, CAPTURED_NOTE))
    return dataclasses.replace(result, validation=check), original


def refuse_random(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
    """A failed validation of a model that gives other outputs each time it runs the same inputs (from the same
    state) is no rewrite's fault: an ``InputError`` says so (ViTMAE's random masking, a dropout kept active)."""
    copy = eval_copy(model)
    with kept_state(copy):
        first = run_no_grad(copy, inputs)
    with kept_state(copy):
        again = run_no_grad(copy, inputs)
    differs = compare_outputs(first, again).failure
    if differs:
        raise InputError(
            f"{type(model).__name__} gives other outputs each time it runs the same inputs ({differs}): its forward "
            "draws random numbers (random masking or noise, a dropout left active), so no rewrite can be validated "
            "against it; make it deterministic (pass its noise as an input, e.g. ViTMAE's noise=, or turn the "
            "randomness off in its config), or pass validate=False"
        )
