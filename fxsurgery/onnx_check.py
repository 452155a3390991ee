"""Export the original and the rewritten model to ONNX and cross-check them in onnxruntime.

Four ways are compared, at the example batch size and (when the batch axis is dynamic) another one: torch original
(the reference), torch rewritten, onnxruntime original and onnxruntime rewritten, each ORT session once with graph
optimizations disabled and once fully enabled (optimizers have had numerical bugs). The op-type histograms of both
graphs show whether the rewrite survived export: the rewritten sites' Gemm/MatMul nodes became Conv, or the reverse.
"""

from __future__ import annotations

import collections
import contextlib
import io
import logging
import math
import os
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.utils._pytree as pytree
from torch import nn

from fxsurgery.errors import InputError, SurgeryError, one_line
from fxsurgery.result import format_table
from fxsurgery.tracing import normalize_inputs
from fxsurgery.validation import RTOL, SCALE_FLOOR, eval_copy, json_float, random_inputs

__all__ = ["Comparison", "OnnxCheck", "cross_check", "export_onnx", "op_histogram"]

log = logging.getLogger(__name__)

EXPORTERS = ("dynamo", "torchscript")
_OPT_LEVELS = {"disabled": "ORT_DISABLE_ALL", "all": "ORT_ENABLE_ALL"}
_MATMUL_OPS = ("Gemm", "MatMul")
_CONV_OPS = ("Conv", "ConvTranspose")
# Beyond this many parameter bytes a single protobuf (2 GiB limit) cannot hold the model: write external data.
_EXTERNAL_DATA_BYTES = 1_800_000_000


@dataclass(frozen=True)
class Comparison:
    """One pair of outputs compared: ``candidate`` against ``reference`` at one batch size."""

    reference: str
    candidate: str
    batch: int
    max_abs_error: float
    max_rel_error: float
    passed: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "reference": self.reference,
            "candidate": self.candidate,
            "batch": self.batch,
            "max_abs_error": json_float(self.max_abs_error),
            "max_rel_error": json_float(self.max_rel_error),
            "passed": self.passed,
        }


@dataclass(frozen=True)
class OnnxCheck:
    """Outcome of :func:`cross_check`; truthy when every comparison passed and the rewrite is visible."""

    passed: bool
    exporter: str
    original_path: str
    rewritten_path: str
    op_counts: dict[str, dict[str, int]]
    comparisons: tuple[Comparison, ...]
    rtol: float
    rewrite_visible: bool | None
    rewrite_detail: str
    dynamic_batch: bool
    skipped: tuple[str, ...] = field(default=())
    failures: tuple[str, ...] = field(default=())

    def __bool__(self) -> bool:
        return self.passed

    def summary(self) -> str:
        verdict = "PASSED" if self.passed else "FAILED"
        lines = [f"ONNX cross-check {verdict} ({self.exporter} exporter, tolerance {self.rtol:.3g} x output scale)"]
        lines.append(f"  original:  {self.original_path}\n  rewritten: {self.rewritten_path}")
        ops = sorted(set(self.op_counts["original"]) | set(self.op_counts["rewritten"]))
        rows = [(op, self.op_counts["original"].get(op, 0), self.op_counts["rewritten"].get(op, 0)) for op in ops]
        lines.append(format_table(("op", "original", "rewritten"), rows))
        lines.append(f"rewrite visible in the exported graph: {self.rewrite_detail}")
        rows2 = [
            (c.candidate, c.reference, c.batch, f"{c.max_abs_error:.3g}", f"{c.max_rel_error:.3g}",
             "ok" if c.passed else "MISMATCH")
            for c in self.comparisons
        ]  # fmt: skip
        if rows2:
            lines.append(format_table(("candidate", "reference", "batch", "max abs", "max rel", ""), rows2))
        lines += [f"skipped: {s}" for s in self.skipped] + [f"FAILED: {f}" for f in self.failures]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "exporter": self.exporter,
            "original_path": self.original_path,
            "rewritten_path": self.rewritten_path,
            "op_counts": self.op_counts,
            "comparisons": [c.to_dict() for c in self.comparisons],
            "rtol": self.rtol,
            "rewrite_visible": self.rewrite_visible,
            "rewrite_detail": self.rewrite_detail,
            "dynamic_batch": self.dynamic_batch,
            "skipped": list(self.skipped),
            "failures": list(self.failures),
        }


class _Call(nn.Module):
    """Wraps a module so the TorchScript exporter sees a plain nn.Module (it trips on a GraphModule's ``graph``)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *args: Any) -> Any:
        return self.module(*args)


def export_onnx(
    module: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    path: Path,
    *,
    exporter: str = "dynamo",
    dynamic_batch: bool = True,
    opset: int | None = None,
) -> None:
    """Export ``module`` (in eval mode) to ``path``; raises the exporter's exception on failure."""
    names = [f"input_{i}" for i in range(len(inputs))]
    big = sum(p.numel() * p.element_size() for p in module.parameters()) > _EXTERNAL_DATA_BYTES
    kwargs: dict[str, Any] = {"input_names": names, "verbose": False}
    if opset is not None:
        kwargs["opset_version"] = opset
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            dyn = tuple({0: torch.export.Dim("batch")} if t.dim() else None for t in inputs) if dynamic_batch else None
            torch.onnx.export(module, inputs, str(path), dynamo=True, dynamic_shapes=dyn, external_data=big, **kwargs)
        else:
            axes = {n: {0: "batch"} for n, t in zip(names, inputs) if t.dim()} if dynamic_batch else None
            wrapper = _Call(module).train(module.training)  # the exporter restores the wrapper's mode recursively
            # Past 2 GiB the TorchScript exporter writes one file per initializer beside the model, named like
            # "onnx::Conv_497": two models exported into one folder would overwrite each other's weights. Export
            # alone, then keep one data file per model.
            with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
                staged = Path(tmp) / "model.onnx"
                torch.onnx.export(wrapper, inputs, str(staged), dynamo=False, dynamic_axes=axes, **kwargs)
                if len(list(Path(tmp).iterdir())) == 1:
                    os.replace(staged, path)
                else:
                    import onnx

                    onnx.save_model(onnx.load(str(staged)), str(path), save_as_external_data=True,
                                    all_tensors_to_one_file=True, location=f"{path.name}.data")  # fmt: skip


def op_histogram(path: str | os.PathLike) -> dict[str, int]:
    """Count the op types of an ONNX model's main graph."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return dict(sorted(collections.Counter(n.op_type for n in model.graph.node).items()))


def _batch_is_dynamic(path: Path) -> bool:
    """Whether dim 0 of every graph input with dims is symbolic in the exported file."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    dims = [i.type.tensor_type.shape.dim for i in model.graph.input if i.type.tensor_type.shape.dim]
    return all(d[0].dim_param for d in dims)


def _session(path: Path, level: str, providers: Sequence[str]) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _OPT_LEVELS[level])
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=opts, providers=list(providers))


def _ort_run(session: Any, inputs: Sequence[torch.Tensor]) -> list[np.ndarray]:
    feeds = {i.name: _to_numpy(t) for i, t in zip(session.get_inputs(), inputs)}
    return session.run(None, feeds)


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def _leaves(out: Any) -> list[np.ndarray]:
    return [
        x.detach().float().cpu().numpy() if x.dtype == torch.bfloat16 else x.detach().cpu().numpy()
        for x in pytree.tree_leaves(out)
        if isinstance(x, torch.Tensor)
    ]


def _errors(ref: list[np.ndarray], got: list[np.ndarray]) -> tuple[float, float]:
    if len(ref) != len(got):
        return math.inf, math.inf
    max_abs = max_rel = 0.0
    for a, b in zip(ref, got):
        if a.shape != b.shape:
            return math.inf, math.inf
        a64, b64 = a.astype(np.float64), b.astype(np.float64)
        diff = float(np.max(np.abs(a64 - b64))) if a64.size else 0.0
        scale = max(float(np.max(np.abs(a64))) if a64.size else 0.0, SCALE_FLOOR)
        max_abs, max_rel = max(max_abs, diff), max(max_rel, diff / scale)
    return max_abs, max_rel


def _rewrite_visibility(counts: dict[str, dict[str, int]], direction: str | None, n_sites: int | None) -> tuple[bool | None, str]:
    if direction not in ("linear_to_conv", "conv_to_linear") or n_sites is None:
        return None, f"not checked (direction {direction or 'unknown'})"
    orig, rew = counts["original"], counts["rewritten"]
    conv_delta = sum(rew.get(op, 0) for op in _CONV_OPS) - sum(orig.get(op, 0) for op in _CONV_OPS)
    mm_delta = sum(rew.get(op, 0) for op in _MATMUL_OPS) - sum(orig.get(op, 0) for op in _MATMUL_OPS)
    sign = 1 if direction == "linear_to_conv" else -1
    ok = conv_delta == sign * n_sites and mm_delta == -sign * n_sites
    detail = f"Conv+ConvTranspose {conv_delta:+d}, Gemm+MatMul {mm_delta:+d} for {n_sites} rewritten site(s)"
    return ok, detail + ("" if ok else f" (expected Conv+ConvTranspose {sign * n_sites:+d}, Gemm+MatMul {-sign * n_sites:+d})")


def cross_check(
    original: nn.Module,
    rewritten: nn.Module,
    example_inputs: Any,
    out_dir: str | os.PathLike,
    *,
    exporter: str = "dynamo",
    providers: Sequence[str] = ("CPUExecutionProvider",),
    dynamic_batch: bool = True,
    opset: int | None = None,
    rtol: float | None = None,
    direction: str | None = None,
    rewritten_sites: int | None = None,
    seed: int = 0,
) -> OnnxCheck:
    """Export both models to ``out_dir`` (``original.onnx``, ``rewritten.onnx``), check them with
    ``onnx.checker.check_model(full_check=True)``, and compare torch and onnxruntime outputs four ways.

    ``direction`` and ``rewritten_sites`` (taken from a :class:`~fxsurgery.SurgeryResult` by :func:`fxsurgery.check`)
    enable the check that the rewrite is visible in the exported op histogram.
    """
    import onnx

    if exporter not in EXPORTERS:
        raise InputError(f"unknown exporter {exporter!r}; use one of {', '.join(EXPORTERS)}")
    import onnxruntime as ort

    available = ort.get_available_providers()
    unknown = [p for p in providers if p not in available]
    if unknown:
        raise InputError(f"onnxruntime execution provider(s) {unknown} not available here; available: {available}")
    inputs = normalize_inputs(example_inputs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"original": out / "original.onnx", "rewritten": out / "rewritten.onnx"}
    models = {"original": eval_copy(original, "native"), "rewritten": eval_copy(rewritten, "native")}
    skipped: list[str] = []
    failures: list[str] = []
    dynamic = dynamic_batch and inputs[0].dim() > 0
    gen = torch.Generator().manual_seed(seed)
    # torch.export specialises a dimension of size 1: trace a dynamic batch with at least 2 samples.
    export_inputs = random_inputs(inputs, gen, batch=2) if dynamic and inputs[0].shape[0] < 2 else inputs
    for name, module in models.items():
        log.info("exporting %s model to %s", name, paths[name])
        try:
            export_onnx(module, export_inputs, paths[name], exporter=exporter, dynamic_batch=dynamic, opset=opset)
        except Exception as e:
            if not dynamic:
                raise SurgeryError(f"ONNX export of the {name} model failed ({exporter}): {one_line(e)}") from e
            skipped.append(f"dynamic batch axis: export failed ({one_line(e)}); exported with a static batch")
            dynamic = False
            for again, m in models.items():
                export_onnx(m, inputs, paths[again], exporter=exporter, dynamic_batch=False, opset=opset)
            break
    if dynamic:
        static = [name for name, path in paths.items() if not _batch_is_dynamic(path)]
        if static:
            skipped.append(f"dynamic batch axis: the exporter specialised the batch of {', '.join(static)}.onnx; "
                           "re-exported with a static batch")  # fmt: skip
            dynamic = False
            for name, m in models.items():
                export_onnx(m, inputs, paths[name], exporter=exporter, dynamic_batch=False, opset=opset)
    for name, path in paths.items():
        try:
            onnx.checker.check_model(str(path), full_check=True)
        except Exception as e:
            _limit_or_fail(f"onnx.checker rejects {name}.onnx: {one_line(e)}", inputs, skipped, failures)
    counts = {name: op_histogram(path) for name, path in paths.items()}
    visible, detail = _rewrite_visibility(counts, direction, rewritten_sites)
    if visible is False:
        failures.append(f"the rewrite is not visible in the exported graph: {detail}")

    tol = _tolerance(inputs, rtol)
    batches = [inputs]
    if dynamic:
        n = int(inputs[0].shape[0])
        batches.append(random_inputs(inputs, gen, batch=n + 1))  # small: ORT runs are a visible part of the cost
    # torch outputs first, then one onnxruntime session at a time (a large model's sessions each hold its weights)
    outputs: list[dict[str, list[np.ndarray]]] = []
    for batch_inputs in batches:
        with torch.no_grad():
            outputs.append({
                "torch original": _leaves(models["original"](*[t.clone() for t in batch_inputs])),
                "torch rewritten": _leaves(models["rewritten"](*[t.clone() for t in batch_inputs])),
            })  # fmt: skip
    for name in paths:
        for level in _OPT_LEVELS:
            label = f"ORT {name} [opt {level}]"
            try:
                session = _session(paths[name], level, providers)
            except Exception as e:
                _limit_or_fail(f"onnxruntime cannot load {name}.onnx (opt {level}): {one_line(e)}", inputs, skipped, failures)
                continue
            for batch_inputs, got in zip(batches, outputs):
                try:
                    got[label] = _ort_run(session, batch_inputs)
                except Exception as e:
                    n = int(batch_inputs[0].shape[0]) if batch_inputs[0].dim() else 1
                    _limit_or_fail(f"{label} fails at batch {n}: {one_line(e)}", inputs, skipped, failures)
            del session
    comparisons: list[Comparison] = []
    for batch_inputs, candidates in zip(batches, outputs):
        n = int(batch_inputs[0].shape[0]) if batch_inputs[0].dim() else 1
        reference = candidates.pop("torch original")
        for label, got in candidates.items():
            max_abs, max_rel = _errors(reference, got)
            comparisons.append(Comparison("torch original", label, n, max_abs, max_rel, max_rel <= tol))
        for level in _OPT_LEVELS:
            a, b = f"ORT original [opt {level}]", f"ORT rewritten [opt {level}]"
            if a in candidates and b in candidates:
                max_abs, max_rel = _errors(candidates[a], candidates[b])
                comparisons.append(Comparison(a, b, n, max_abs, max_rel, max_rel <= tol))
    failures += [f"{c.candidate} vs {c.reference} at batch {c.batch}: max rel error {c.max_rel_error:.3g} > {tol:.3g}"
                 for c in comparisons if not c.passed]  # fmt: skip
    if not dynamic_batch:
        skipped.append("second batch size: the batch axis was exported static on request")
    return OnnxCheck(
        passed=not failures,
        exporter=exporter,
        original_path=str(paths["original"]),
        rewritten_path=str(paths["rewritten"]),
        op_counts=counts,
        comparisons=tuple(comparisons),
        rtol=tol,
        rewrite_visible=visible,
        rewrite_detail=detail,
        dynamic_batch=dynamic,
        skipped=tuple(skipped),
        failures=tuple(failures),
    )


def _tolerance(inputs: Sequence[torch.Tensor], rtol: float | None) -> float:
    if rtol is not None:
        return rtol
    return max((RTOL.get(t.dtype, RTOL[torch.float32]) for t in inputs if t.is_floating_point()), default=RTOL[torch.float32])


def _limit_or_fail(message: str, inputs: Sequence[torch.Tensor], skipped: list[str], failures: list[str]) -> None:
    """Missing kernels for a dtype other than float32 are a reported limit, not a failure.

    (onnxruntime CPU has no float64 Conv and no bfloat16 Gemm; ONNX allows bfloat16 Conv only from opset 22.)
    """
    dtypes = {t.dtype for t in inputs if t.is_floating_point()}
    if dtypes - {torch.float32}:
        names = ", ".join(sorted(str(d).removeprefix("torch.") for d in dtypes))
        skipped.append(f"{message} [dtype limit: {names}; bfloat16 Conv needs opset=22]")
    else:
        failures.append(message)
