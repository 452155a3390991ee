"""The public entry points: :func:`linear_to_conv`, :func:`conv_to_linear`, :func:`rewrite` and :func:`check`.

Each takes the model, example inputs and the options (keywords, or one :class:`~fxsurgery.Options`), resolved in
:mod:`fxsurgery.options`. ``to="auto"`` is a planner (:mod:`fxsurgery.plan.auto`) that the pipeline
(:mod:`fxsurgery.pipeline`) runs between the passes that list the sites and the validation of the model it chose.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fxsurgery.capture import keyword_call, normalize_inputs, prepare_model, refuse_meta, split_keywords
from fxsurgery.capture.export import dynamic_axes
from fxsurgery.capture.programs import export_rewritten, module_of_program
from fxsurgery.capture.quantized import quantized_program
from fxsurgery.errors import InputError, ValidationError
from fxsurgery.options import OPTIONS_DOC, Options, resolve
from fxsurgery.pipeline import run_auto, run_pass, run_quantized
from fxsurgery.progress import step
from fxsurgery.report import CheckReport, SurgeryResult
from fxsurgery.rules import DIRECTIONS
from fxsurgery.runtimes.census import census
from fxsurgery.verify.cross_check import cross_check
from fxsurgery.verify.policy import QUANTIZED_RTOL
from fxsurgery.verify.quantized import compare_quantized

__all__ = ["linear_to_conv", "conv_to_linear", "rewrite", "check"]


def rewrite(
    model: nn.Module | torch.export.ExportedProgram,
    example_inputs: Any,
    direction: str,
    *,
    options: Options | None = None,
    **overrides: Any,
) -> SurgeryResult:
    """Run one direction over ``model``: ``"linear_to_conv"`` / ``"conv"`` (Linear layers on flattened or pooled
    maps, their chains and, with ``token_layout=True``, transformer blocks, as Conv2d) or ``"conv_to_linear"`` /
    ``"linear"`` (pointwise, strided pointwise, full-extent, Conv1d k=1 and ConvTranspose 1x1 convolutions as
    Linear), or ``"auto"``: per site the faster form, measured on ``runtime`` (see :mod:`fxsurgery.plan.auto`).

    ``example_inputs`` is a tensor or a tuple of tensors, which may end with a dict of keyword inputs
    (``(ids, {"attention_mask": mask})``; a dict alone is all keywords); shapes are propagated from them with meta
    tensors. With keyword inputs, the rewritten module takes them in that order, positionally or by name.
    Returns a :class:`~fxsurgery.SurgeryResult` listing every candidate site, rewritten or skipped with its reason.
    """
    opts = resolve(options, overrides)
    direction = DIRECTIONS.get(direction, direction)
    quantized = quantized_program(model)
    if quantized is not None:
        return _rewrite_quantized(quantized, example_inputs, direction, opts)
    if isinstance(model, torch.export.ExportedProgram):
        return _rewrite_program(model, example_inputs, direction, opts)
    model, inputs = _with_keywords(model, example_inputs)
    with dynamic_axes(opts.dynamic_batch, opts.dynamic_sequence):
        if direction == "auto":
            return run_auto(prepare_model(model), inputs, opts)
        return run_pass(model, inputs, direction, opts)


def _rewrite_program(
    program: torch.export.ExportedProgram, example_inputs: Any, direction: str, opts: Options
) -> SurgeryResult:
    """An ExportedProgram: its graph through the export front end (``example_inputs=None``: the program's own
    example inputs), and the rewritten model exported again as ``result.program``."""
    if opts.frontend == "fx" or direction == "auto":
        raise InputError(
            "an ExportedProgram is rewritten through the export front end, in one direction: pass "
            "frontend='auto' or 'export' and to='conv' or 'linear'"
        )
    if example_inputs is None:
        example_inputs = _program_inputs(program)
    model = module_of_program(program)
    inputs, _, keywords = _flat_inputs(example_inputs)
    result = run_pass(model, inputs, direction, dataclasses.replace(opts, frontend="export"), program=program)
    out, notes = export_rewritten(result.module, program, inputs, keywords)
    return dataclasses.replace(result, program=out, notes=(*result.notes, *notes))


def _rewrite_quantized(model: Any, example_inputs: Any, direction: str, opts: Options) -> SurgeryResult:
    """A quantized graph: rewritten as the exported graph it is (see :func:`~fxsurgery.pipeline.run_quantized`)."""
    if direction == "auto":
        raise InputError("to='auto' does not time quantized graphs; choose to='conv' or to='linear'")
    if example_inputs is None and isinstance(model, torch.export.ExportedProgram):
        example_inputs = _program_inputs(model)
    inputs, n_positional, _ = _flat_inputs(example_inputs)
    if n_positional != len(inputs):
        raise InputError("a quantized graph is rewritten with positional example inputs only; pass them in order")
    return run_quantized(model, inputs, direction, opts)


def _program_inputs(program: torch.export.ExportedProgram) -> Any:
    """The example inputs an ExportedProgram holds, as ``example_inputs`` (keywords in a trailing dict)."""
    if program.example_inputs is None:
        raise InputError("this ExportedProgram holds no example inputs: pass example_inputs")
    args, kwargs = program.example_inputs
    return (*args, kwargs) if kwargs else tuple(args)


def _with_keywords(model: nn.Module, example_inputs: Any) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """The model and its inputs, all positional (keyword inputs follow the positional ones)."""
    inputs, n_positional, names = _flat_inputs(example_inputs)
    return (keyword_call(model, n_positional, names) if names else model), inputs


def _flat_inputs(example_inputs: Any) -> tuple[tuple[torch.Tensor, ...], int, tuple[str, ...]]:
    """Every example input in order (the keyword ones after the positional ones), how many are positional, and
    the keyword names."""
    positional, keywords = split_keywords(example_inputs)
    given = () if isinstance(positional, tuple) and not positional else normalize_inputs(positional)
    return normalize_inputs((*given, *keywords.values())), len(given), tuple(keywords)


def linear_to_conv(
    model: nn.Module, example_inputs: Any, *, options: Options | None = None, **overrides: Any
) -> SurgeryResult:
    """Rewrite Linear layers on flattened or pooled feature maps (and their chains) as Conv2d layers; with
    ``token_layout=True`` also every Linear and self-/window attention of transformer blocks (``flatten->linear``,
    ``pool->linear``, ``chain-linear``, ``channels-last-linear``, ``token-linear``, ``self-attention``,
    ``window-attention``). Weights are views of the original's."""
    return rewrite(model, example_inputs, "linear_to_conv", options=options, **overrides)


def conv_to_linear(
    model: nn.Module, example_inputs: Any, *, options: Options | None = None, **overrides: Any
) -> SurgeryResult:
    """Rewrite pointwise (1x1, also strided), full-extent, 1-D kernel-1 and 1x1 transposed convolutions as Linear
    layers (``conv1x1``, ``conv1x1-strided``, ``conv-full-extent``, ``conv1d-k1``, ``convtranspose1x1``). Weights
    are views of the original's."""
    return rewrite(model, example_inputs, "conv_to_linear", options=options, **overrides)


def check(
    model: nn.Module | torch.export.ExportedProgram,
    example_inputs: Any,
    to: str = "conv",
    out_dir: str | os.PathLike = "fxsurgery-out",
    *,
    onnx: bool = True,
    options: Options | None = None,
    **overrides: Any,
) -> CheckReport:
    """Rewrite ``model`` towards ``to`` (``"conv"``, ``"linear"`` or ``"auto"``), validate, export both versions
    to ONNX in ``out_dir`` and cross-check them in onnxruntime with the cross-check options below (``exporter``,
    ``providers``, ``opset``, ``dynamic_batch``, ``runtimes``: also OpenVINO and/or ExecuTorch-XNNPACK, with their
    extras installed); the cross-check compares with the validation's ``rtol`` when one is given. ``onnx=False``
    skips the cross-check. With ``quantize=`` (``"int8"`` or a PT2E quantizer) both versions are also quantized
    with that recipe (and both ONNX files with onnxruntime's static QDQ) and compared
    (:func:`fxsurgery.verify.quantized.compare_quantized`). A quantized model is compared to ``QUANTIZED_RTOL``
    unless ``rtol`` is given (onnxruntime runs its q/dq pairs as int8 kernels, which round as the float reference may
    not).

    A validation mismatch does not stop the export: the report carries both results and ``passed`` is False.
    ``model`` may be an ExportedProgram (``example_inputs=None``: its own); the cross-check then compares against
    ``program.module()``.
    """
    opts = resolve(options, overrides)
    if quantized_program(model) is not None:
        if opts.quantize is not None:
            raise InputError(
                "quantize= quantizes a float model and its rewrite with one recipe; this model is already quantized "
                "(its rewrite is compared with it as it is): drop quantize=, or pass the float model"
            )
        if opts.rtol is None:  # int8 kernels round as the float reference may not
            opts = dataclasses.replace(opts, rtol=QUANTIZED_RTOL)
    program = model if isinstance(model, torch.export.ExportedProgram) else None
    if program is not None:
        example_inputs = _program_inputs(program) if example_inputs is None else example_inputs
    module = program.module() if program is not None else model
    if not isinstance(module, nn.Module):
        raise InputError(f"expected a torch.nn.Module or a torch.export.ExportedProgram, got {type(module).__name__}")
    if onnx:
        refuse_meta(module, example_inputs, "check (the ONNX export and the onnxruntime cross-check)")
    model, inputs = _with_keywords(module, example_inputs)
    try:  # a program is rewritten as a program (its own graph, through the export front end)
        with step(f"rewriting towards {to} and validating ({opts.precision})"):
            result = (
                rewrite(program, example_inputs, to, options=opts)
                if program is not None
                else rewrite(model, inputs, to, options=opts)
            )
    except ValidationError as e:
        result = e.result
    onnx_check = None
    if onnx:
        direction, sites = result.direction, sum(s.calls for s in result.rewritten)  # a shared layer's every call
        onnx_check = cross_check(
            model, result.module, inputs, out_dir, options=opts, direction=direction, rewritten_sites=sites
        )
    quantized = None
    if opts.quantize is not None:
        paths = (
            {"original": Path(onnx_check.original_path), "rewritten": Path(onnx_check.rewritten_path)}
            if onnx_check
            else None
        )
        with step("quantizing both versions and comparing them"):
            quantized = compare_quantized(model, result.module, inputs, opts.quantize, paths, seed=opts.seed)
    census = _target_census(opts.target, model, result, inputs, onnx_check, Path(out_dir))
    return CheckReport(result, onnx_check, census, quantized)


def _target_census(
    target: str | None,
    model: nn.Module,
    result: SurgeryResult,
    inputs: tuple[torch.Tensor, ...],
    onnx_check: Any,
    out_dir: Path,
) -> dict[str, Any] | None:
    """The op census of both models after the target's own conversion, each conversion written to ``out_dir`` as
    the target deploys it (None without a target)."""
    if target is None:
        return None
    paths = (onnx_check.original_path, onnx_check.rewritten_path) if onnx_check is not None else None
    out_dir.mkdir(parents=True, exist_ok=True)
    return {"name": target, "census": census(target, model, result.module, inputs, paths, out_dir)}


for _f in (rewrite, linear_to_conv, conv_to_linear, check):
    _f.__doc__ = f"{inspect.cleandoc(_f.__doc__ or '')}\n{OPTIONS_DOC}"
