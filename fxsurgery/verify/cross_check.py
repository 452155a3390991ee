"""Export the original and the rewritten model to ONNX and cross-check them in onnxruntime.

Three stages, as Polygraphy splits runners from the comparator: *export* (both models, batch axis dynamic when the
exporter keeps it so, then ``onnx.checker``), *run* (torch original, torch rewritten, and each ONNX file in
onnxruntime with graph optimizations disabled and fully enabled, at the example batch size and another one) and
*compare* (every candidate against torch original, and onnxruntime rewritten against onnxruntime original, under
the one comparison policy of :mod:`~fxsurgery.verify.policy`). The op-type histograms of both graphs show whether
the rewrite survived export: the rewritten sites' Gemm/MatMul nodes became Conv, or the reverse.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn

from fxsurgery.artifacts.onnx_export import op_histogram
from fxsurgery.capture.copies import eval_copy
from fxsurgery.capture.inputs import is_tokens, normalize_inputs
from fxsurgery.errors import InputError, full_text
from fxsurgery.options import Options, resolve
from fxsurgery.progress import step
from fxsurgery.report import Comparison, OnnxCheck
from fxsurgery.runtimes.ort import OPT_LEVELS, run_session, session
from fxsurgery.runtimes.registry import RUNTIMES, get, run
from fxsurgery.verify.export_stage import NAMES, Findings, Settings, check_files, export_both, input_names, name_outputs
from fxsurgery.verify.localize import first_divergence, first_failing_node
from fxsurgery.verify.policy import SCALE_FLOOR, compare_leaves
from fxsurgery.verify.validation import random_inputs, run_no_grad

__all__ = ["cross_check"]

#: Matrix products (attention carried per head computes its two products as Einsum where SDPA exports MatMul).
_MATMUL_OPS = ("Gemm", "MatMul", "Einsum")
_CONV_OPS = ("Conv", "ConvTranspose")


def _another_batch(inputs: tuple[torch.Tensor, ...], gen: torch.Generator, level: str) -> tuple[torch.Tensor, ...]:
    """Fresh inputs at the next batch size and, where the sequence axis is dynamic, 3/4 of the sequence."""
    other = random_inputs(inputs, gen, batch=_batch(inputs) + 1)
    if level != "batch+sequence":
        return other
    return tuple(t[:, : max(1, t.shape[1] * 3 // 4)].contiguous() if is_tokens(t) else t for t in other)


def _batch(inputs: Sequence[torch.Tensor]) -> int:
    return int(inputs[0].shape[0]) if inputs[0].dim() else 1


def _tensor_leaves(out: Any) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def _run_more(
    models: dict[str, nn.Module],
    batches: list[tuple],
    runtimes: Sequence[str],
    found: Findings,
    outputs: list[dict[str, list[Any]]],
) -> None:
    """The optional runtimes' outputs (:mod:`~fxsurgery.runtimes.registry`): where one cannot run the original, that is
    its limit (skipped); where it runs the original and not the rewritten model, a failure."""
    for rt in runtimes:
        label = RUNTIMES[rt].label
        for name in NAMES:
            for batch_inputs, got in zip(batches, outputs):
                try:
                    with step(f"running the {name} model on {label} (batch {_batch(batch_inputs)})"):
                        got[f"{label} {name}"] = run(rt, models[name], batch_inputs)
                except Exception as e:
                    message = f"{label} cannot run the {name} model at batch {_batch(batch_inputs)}: {full_text(e)}"
                    if name == "rewritten" and f"{label} original" in got:
                        found.failures.append(f"{message}; {_runtime_localized(rt, models[name], batch_inputs)}")
                    else:
                        found.skipped.append(message)


def _runtime_localized(rt: str, module: nn.Module, inputs: tuple, rtol: float | None = None) -> str:
    """Where an optional runtime first goes wrong on ``module`` (:func:`~fxsurgery.verify.localize.
    first_failing_node`)."""
    return first_failing_node(lambda m, x: run(rt, m, x), module, inputs, rtol=rtol)


def _run(
    models: dict[str, nn.Module],
    paths: dict[str, Path],
    batches: list[tuple],
    providers: Sequence[str],
    found: Findings,
) -> list[dict[str, list[Any]]]:
    """Outputs per batch, by runner: torch first, then one onnxruntime session at a time (a large model's sessions
    each hold its weights)."""
    outputs: list[dict[str, list[Any]]] = [
        {f"torch {n}": _tensor_leaves(run_no_grad(models[n], b)) for n in NAMES} for b in batches
    ]
    for name in NAMES:
        for level in OPT_LEVELS:
            label = f"ORT {name} [opt {level}]"
            with step(f"running {name}.onnx in onnxruntime (graph optimizations {level})"):
                try:
                    sess = session(paths[name], optimization=level, providers=providers)
                except Exception as e:
                    found.limit_or_fail(f"onnxruntime cannot load {name}.onnx (opt {level}): {full_text(e)}")
                    continue
                for batch_inputs, got in zip(batches, outputs):
                    try:
                        got[label] = run_session(sess, batch_inputs)
                    except Exception as e:
                        found.limit_or_fail(f"{label} fails at batch {_batch(batch_inputs)}: {full_text(e)}")
                del sess
    return outputs


def _compare(
    batches: list[tuple], outputs: list[dict[str, list[Any]]], rtol: float | None
) -> tuple[list[Comparison], float]:
    """Every comparison, and the largest tolerance applied (it follows each output's dtype)."""
    labels = sorted(dict.fromkeys(label for got in outputs for label in got), key=_group)  # stable: as first seen
    pairs = [("torch original", label) for label in labels if label != "torch original"]
    pairs += [
        (label, label.replace("original", "rewritten"))
        for label in labels
        if "original" in label and label != "torch original"
    ]  # each runtime: rewritten against original
    comparisons, tol = [], 0.0
    for batch_inputs, got in zip(batches, outputs):
        for ref, cand in pairs:
            if ref in got and cand in got:
                reference = [t if isinstance(t, torch.Tensor) else torch.as_tensor(t) for t in got[ref]]
                e = compare_leaves(reference, got[cand], rtol=rtol)
                tol = max(tol, e.rtol)
                comparisons.append(
                    Comparison(ref, cand, _batch(batch_inputs), e.max_abs, e.max_rel, not e.failure, e.failure)
                )
    return comparisons, tol


def _group(label: str) -> int:
    """torch, then onnxruntime, then the optional runtimes."""
    return 0 if label.startswith("torch") else 1 if label.startswith("ORT") else 2


def _visibility(
    counts: dict[str, dict[str, int]], direction: str | None, n_sites: int | None
) -> tuple[bool | None, str]:
    """Whether the rewritten sites' Gemm/MatMul nodes became Conv (or the reverse) in the exported graph."""
    if direction not in ("linear_to_conv", "conv_to_linear") or n_sites is None:
        return None, f"not checked (direction {direction or 'unknown'})"
    orig, rew = counts["original"], counts["rewritten"]
    conv_delta = sum(rew.get(op, 0) for op in _CONV_OPS) - sum(orig.get(op, 0) for op in _CONV_OPS)
    mm_delta = sum(rew.get(op, 0) for op in _MATMUL_OPS) - sum(orig.get(op, 0) for op in _MATMUL_OPS)
    sign = 1 if direction == "linear_to_conv" else -1
    ok = conv_delta == sign * n_sites and mm_delta == -sign * n_sites
    detail = f"Conv+ConvTranspose {conv_delta:+d}, Gemm+MatMul+Einsum {mm_delta:+d} for {n_sites} rewritten call(s)"
    if not ok:
        detail += f" (expected Conv+ConvTranspose {sign * n_sites:+d}, Gemm+MatMul+Einsum {-sign * n_sites:+d})"
    return ok, detail


def cross_check(
    original: nn.Module,
    rewritten: nn.Module,
    example_inputs: Any,
    out_dir: str | os.PathLike,
    *,
    options: Options | None = None,
    direction: str | None = None,
    rewritten_sites: int | None = None,
    **overrides: Any,
) -> OnnxCheck:
    """Export both models to ``out_dir`` (``original.onnx``, ``rewritten.onnx``), check them with
    ``onnx.checker.check_model(full_check=True)``, and compare torch and onnxruntime outputs four ways; with
    ``runtimes`` (``"openvino"``, ``"executorch"``) also each of those runtimes' outputs of both models, against
    torch original and rewritten against original (:mod:`~fxsurgery.runtimes.registry`). The settings (``exporter``,
    ``providers``, ``opset``, ``dynamic_batch``, ``runtimes``, ``rtol``, ``seed``) are options, as keywords or one
    ``options=fxsurgery.Options(...)``.

    ``direction`` and ``rewritten_sites`` (taken from a :class:`~fxsurgery.SurgeryResult` by :func:`fxsurgery.check`:
    the calls of rewritten layers, each call of a shared one) enable the check that the rewrite is visible in the
    exported op histogram.
    """
    opts = resolve(options, overrides)
    exporter, providers, opset, rtol, runtimes = opts.exporter, opts.providers, opts.opset, opts.rtol, opts.runtimes
    dynamic_batch, seed = opts.dynamic_batch, opts.seed
    inputs = normalize_inputs(example_inputs)
    _check_providers(providers)
    for rt in runtimes:
        get(rt, "run", "cross-check")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / f"{name}.onnx" for name in NAMES}
    models = {"original": eval_copy(original), "rewritten": eval_copy(rewritten)}
    found = Findings(inputs)
    dynamic = dynamic_batch and inputs[0].dim() > 0
    gen = torch.Generator().manual_seed(seed)
    # torch.export specialises a dimension of size 1: trace a dynamic batch with at least 2 samples.
    export_inputs = random_inputs(inputs, gen, batch=2) if dynamic and inputs[0].shape[0] < 2 else inputs
    tokens = [opts.dynamic_sequence and is_tokens(t) for t in inputs]
    settings = Settings(exporter, opset, input_names(models["original"], len(inputs)), tokens)
    level = export_both(models, paths, inputs, export_inputs, dynamic, found, settings)
    dynamic = level != "static"
    name_outputs(models["original"], inputs, paths)
    check_files(paths, found)
    counts = {name: op_histogram(path) for name, path in paths.items()}
    visible, detail = _visibility(counts, direction, rewritten_sites)
    if visible is False:
        found.failures.append(f"the rewrite is not visible in the exported graph: {detail}")
    # the second batch is small: onnxruntime runs are a visible part of the cost
    batches = [inputs] + ([_another_batch(inputs, gen, level)] if dynamic else [])
    outputs = _run(models, paths, batches, providers, found)
    _run_more(models, batches, runtimes, found, outputs)
    comparisons, tol = _compare(batches, outputs, rtol)
    found.failures += [
        f"{c.candidate} vs {c.reference} at batch {c.batch}: {c.failure}" for c in comparisons if not c.passed
    ]
    _localize(comparisons, models, paths, batches, outputs, exporter, tol, found)
    _localize_runtimes(comparisons, models["rewritten"], batches, runtimes, rtol, found)
    if not dynamic_batch:
        found.skipped.append("second batch size: the batch axis was exported static on request")
    return OnnxCheck(
        passed=not found.failures,
        exporter=exporter,
        original_path=str(paths["original"]),
        rewritten_path=str(paths["rewritten"]),
        op_counts=counts,
        comparisons=tuple(comparisons),
        rtol=tol or (rtol or 0.0),
        rewrite_visible=visible,
        rewrite_detail=detail,
        dynamic_batch=dynamic,
        skipped=tuple(found.skipped),
        failures=tuple(found.failures),
    )


def _localize(
    comparisons: list[Comparison],
    models: dict[str, nn.Module],
    paths: dict[str, Path],
    batches: list[tuple],
    outputs: list[dict[str, list[Any]]],
    exporter: str,
    tol: float,
    found: Findings,
) -> None:
    """For each ONNX file onnxruntime ran wrong (against torch), the first intermediate value that departs by more
    than the bound its outputs failed (``tol`` x the output scale of torch original, already run per batch)."""
    for name in NAMES:
        failed = [
            c
            for c in comparisons
            if not c.passed and c.candidate.startswith(f"ORT {name}") and c.reference.startswith("torch")
        ]
        if not failed:
            continue
        if exporter != "dynamo":
            found.failures.append(f"{name}.onnx: localizing the difference needs the dynamo exporter")
            continue
        k = next(k for k, b in enumerate(batches) if _batch(b) == failed[0].batch)
        batch, reference = batches[k], outputs[k]["torch original"]
        scale = max([float(t.detach().abs().max()) for t in reference if t.is_floating_point() and t.numel()] + [0.0])
        bound = tol * max(scale, SCALE_FLOOR)
        with step(f"localizing where {name}.onnx departs from torch"):
            found.failures.append(f"{name}.onnx: " + first_divergence(models[name], batch, paths[name], bound))


def _localize_runtimes(
    comparisons: list[Comparison],
    rewritten: nn.Module,
    batches: list[tuple],
    runtimes: Sequence[str],
    rtol: float | None,
    found: Findings,
) -> None:
    """For each optional runtime that runs the rewritten model wrong, the first node it computes wrong."""
    for rt in runtimes:
        label = RUNTIMES[rt].label
        wrong = [c for c in comparisons if not c.passed and c.candidate == f"{label} rewritten"]
        if wrong:
            batch = next(b for b in batches if _batch(b) == wrong[0].batch)
            with step(f"localizing where {label} departs from torch"):
                found.failures.append(f"{label} rewritten: {_runtime_localized(rt, rewritten, batch, rtol)}")


def _check_providers(providers: Sequence[str]) -> None:
    import onnxruntime as ort

    available = ort.get_available_providers()
    unknown = [p for p in providers if p not in available]
    if unknown:
        raise InputError(f"onnxruntime execution provider(s) {unknown} not available here; available: {available}")
