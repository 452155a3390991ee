"""The public passes: :func:`linear_to_conv` and :func:`conv_to_linear`.

Each traces the model, copies its structure (parameters stay views of the original storage), propagates shapes with
fake tensors, applies its rule set, validates the result numerically and returns a :class:`SurgeryResult`. The
user's model, its buffers and the example inputs are never modified.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from fxsurgery import validation as _validation
from fxsurgery.errors import InputError, SurgeryError, ValidationError
from fxsurgery.result import Site, SurgeryResult
from fxsurgery.rules import RULES, Rewriter, Rule
from fxsurgery.tracing import LeafSpec, normalize_inputs, prepare_model, propagate_shapes, trace, working_copy

__all__ = ["linear_to_conv", "conv_to_linear", "rewrite"]

log = logging.getLogger(__name__)

DIRECTIONS = {"conv": "linear_to_conv", "linear": "conv_to_linear"}


def linear_to_conv(
    model: nn.Module,
    example_inputs: torch.Tensor | tuple[torch.Tensor, ...],
    *,
    validate: bool = True,
    leaf_modules: LeafSpec = (),
    exclude: Sequence[str] = (),
    precision: _validation.Precision = "native",
    rtol: float | None = None,
    num_random: int = 2,
    seed: int = 0,
    batch_layout: str = "spatial",
) -> SurgeryResult:
    """Rewrite Linear layers on flattened or pooled feature maps (and their chains) as Conv2d layers.

    ``leaf_modules``: module types or qualified names that torch.fx should not trace into. ``exclude``: site names to
    leave alone. ``precision="float64"`` validates in float64 to prove exactness. ``rtol`` overrides the per-dtype
    tolerance. ``batch_layout``: ``"spatial"`` (default) carries the rewritten head as ``(1, C, 1, N)``, the batch
    side by side on the width axis, so each conv is one matrix product; ``"batch"`` keeps ``(N, C, 1, 1)`` (N small
    products: several times slower at batch > 1 in onnxruntime). Raises :class:`~fxsurgery.ValidationError` when
    outputs differ beyond tolerance.
    """
    return rewrite(model, example_inputs, "linear_to_conv", validate=validate, leaf_modules=leaf_modules,
                   exclude=exclude, precision=precision, rtol=rtol, num_random=num_random, seed=seed,
                   batch_layout=batch_layout)  # fmt: skip


def conv_to_linear(
    model: nn.Module,
    example_inputs: torch.Tensor | tuple[torch.Tensor, ...],
    *,
    validate: bool = True,
    leaf_modules: LeafSpec = (),
    exclude: Sequence[str] = (),
    precision: _validation.Precision = "native",
    rtol: float | None = None,
    num_random: int = 2,
    seed: int = 0,
) -> SurgeryResult:
    """Rewrite pointwise (1x1, also strided), full-extent and 1-D kernel-1 convolutions as Linear layers.

    Arguments as for :func:`linear_to_conv`.
    """
    return rewrite(model, example_inputs, "conv_to_linear", validate=validate, leaf_modules=leaf_modules,
                   exclude=exclude, precision=precision, rtol=rtol, num_random=num_random, seed=seed)  # fmt: skip


def rewrite(
    model: nn.Module,
    example_inputs: Any,
    direction: str,
    *,
    validate: bool = True,
    leaf_modules: LeafSpec = (),
    exclude: Sequence[str] = (),
    precision: _validation.Precision = "native",
    rtol: float | None = None,
    num_random: int = 2,
    seed: int = 0,
    batch_layout: str = "spatial",
) -> SurgeryResult:
    """Run one direction (``"linear_to_conv"`` or ``"conv_to_linear"``; ``"conv"``/``"linear"`` name the target)."""
    direction = DIRECTIONS.get(direction, direction)
    if direction not in RULES:
        raise InputError(f"unknown direction {direction!r}; use one of {sorted(RULES)} (or 'conv' / 'linear')")
    options = {"batch_layout": batch_layout} if direction == "linear_to_conv" else {}
    make_rule = functools.partial(RULES[direction], **options)
    make_rule()  # check the options before any work
    if precision not in ("native", "float64"):
        raise InputError(f"precision must be 'native' or 'float64', got {precision!r}")
    if isinstance(exclude, str):
        exclude = (exclude,)
    inputs = normalize_inputs(example_inputs)
    model = prepare_model(model)
    if validate and any(p.device.type == "meta" for p in model.parameters()):
        raise InputError("the model's parameters are on the meta device and hold no values; pass validate=False")
    log.info("tracing %s", type(model).__name__)
    traced = trace(model, leaf_modules, n_inputs=len(inputs))
    try:
        gm, sites = _apply(traced, inputs, make_rule, exclude)
    except SurgeryError:
        raise
    except Exception as e:
        raise SurgeryError(f"internal error while rewriting ({type(e).__name__}: {e}); please report it") from e
    result = SurgeryResult(gm, sites, None, direction)
    if not validate:
        return result
    log.info("validating %d rewritten sites", len(result.rewritten))
    original = _validation.eval_copy(model, precision)
    check = _validation.validate(model, gm, inputs, num_random=num_random, precision=precision, rtol=rtol,
                                 seed=seed, original_copy=original)  # fmt: skip
    result = SurgeryResult(gm, sites, check, direction)
    if not check:
        culprits = _find_culprits(traced, inputs, make_rule, exclude, result, original, precision, rtol, seed)
        named = ", ".join(f"{s.name} ({s.pattern})" for s in culprits) or "the combination of rewritten sites"
        raise ValidationError(
            f"validation failed: {check.failure}; responsible: {named}. Exclude the site with exclude=[...] and "
            "report the model",
            result=result,
            sites=tuple(s.name for s in culprits),
        )
    return result


def _apply(
    traced: fx.GraphModule, inputs: tuple[torch.Tensor, ...], make_rule: Callable[[], Rule], exclude: Sequence[str]
) -> tuple[fx.GraphModule, list[Site]]:
    gm = working_copy(traced)
    gm.train(traced.training)
    propagate_shapes(gm, inputs)
    sites = Rewriter(gm, exclude).run(make_rule())
    return gm, sites


def _find_culprits(
    traced: fx.GraphModule,
    inputs: tuple[torch.Tensor, ...],
    make_rule: Callable[[], Rule],
    exclude: Sequence[str],
    result: SurgeryResult,
    original: nn.Module,
    precision: _validation.Precision,
    rtol: float | None,
    seed: int,
) -> list[Site]:
    """Rewrite each site alone and keep those whose single-site model fails validation, worst first."""
    rewritten = result.rewritten
    if len(rewritten) == 1:
        return rewritten
    scored: list[tuple[float, Site]] = []
    for site in rewritten:
        others = [s.name for s in rewritten if s is not site]
        gm, _ = _apply(traced, inputs, make_rule, [*exclude, *others])
        check = _validation.validate(original, gm, inputs, num_random=0, precision=precision, rtol=rtol,
                                     seed=seed, original_copy=original)  # fmt: skip
        if not check:
            scored.append((check.max_rel_error, site))
    scored.sort(key=lambda p: -p[0])
    return [s for _, s in scored]
