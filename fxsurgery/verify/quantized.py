"""Quantize both versions with one recipe and compare them: ``check(..., quantize=...)``.

The float original and its rewrite are each quantized the same way and calibrated on the same inputs:

* **PT2E** (torchao's ``prepare_pt2e``/``convert_pt2e``) with the recipe's quantizer (``"int8"``: XNNPACKQuantizer,
  symmetric per-channel; or the PT2E quantizer the caller passes). Then, on fresh inputs (not the calibration data):
  the rewritten model's int8 outputs against the original's (the share within one output step, and identical), the
  error of each against the float original, the *requantizations* each holds (a quantize that sets qparams of its
  own, not one that passes a permute/view on with those of its input), the *broken islands* (a layout op between a
  dequantize and the linear/conv it feeds, which backends' int8 lowering rejects) and, where ExecuTorch is
  installed, whether each lowers with the XNNPACK partitioner and whether the ``.pte`` programs agree.
* **onnxruntime static QDQ** on the cross-check's two ONNX files: ``quant_pre_process`` (symbolic shape inference)
  and ``quantize_static`` (QDQ, per-channel int8 weights, uint8 activations), then each file's error against the
  float original.

The rewrite fails the check when it adds requantizations or broken islands, does not lower where the original does,
has fewer than :data:`AGREEMENT` of its int8 outputs within one step of the original's, or errs against the float
original by more than :data:`ERROR_MARGIN` beyond the original's (PT2E or onnxruntime).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch import nn

from fxsurgery.capture.copies import eval_copy
from fxsurgery.engine.emit import op_name
from fxsurgery.errors import InputError, one_line
from fxsurgery.rules.aten.linear_to_conv import VIEWS
from fxsurgery.rules.aten.qdq import is_dequantize, is_quantize
from fxsurgery.runtimes.ort import run_session, session
from fxsurgery.runtimes.xnnpack import execute
from fxsurgery.verify.cross_check import NAMES
from fxsurgery.verify.validation import random_inputs

__all__ = ["QuantizedCheck", "compare_quantized", "quantize_pt2e", "layout_census", "lowered_outputs", "AGREEMENT"]

#: The share of the rewritten model's int8 outputs that must lie within one output step of the original's.
AGREEMENT = 0.99
#: How much more error against the float original the quantized rewrite may have than the quantized original.
ERROR_MARGIN = 0.05
#: Fresh batches the quantized versions are compared on (the error of a few outputs is noise).
_FRESH = 8

_TRANSPOSES = ("aten::permute", "aten::permute_copy", "aten::transpose", "aten::t")
_COPIES = ("aten::clone", "dim_order_ops::_clone_dim_order")
_PRODUCTS = ("aten::linear", "aten::convolution", "aten::conv2d", "aten::conv1d", "aten::addmm", "aten::mm")


def quantizer_of(recipe: Any) -> tuple[str, Any]:
    """The recipe's name and its PT2E quantizer (``"int8"``: XNNPACKQuantizer, symmetric per-channel)."""
    if recipe != "int8":
        return type(recipe).__name__, recipe
    try:
        from torchao.testing.pt2e._xnnpack_quantizer import XNNPACKQuantizer, get_symmetric_quantization_config
    except ImportError as e:
        raise InputError(f"quantize='int8' needs torchao's PT2E: pip install 'fxsurgery[quant]' ({e})") from e
    return "int8 (PT2E XNNPACKQuantizer, symmetric per-channel)", XNNPACKQuantizer().set_global(
        get_symmetric_quantization_config(is_per_channel=True)
    )


def quantize_pt2e(model: nn.Module, quantizer: Any, calibration: Sequence[tuple]) -> torch.export.ExportedProgram:
    """``model`` exported, prepared with ``quantizer``, calibrated on each of ``calibration``, converted and exported
    again (the model itself is not touched: PT2E works on the exported graph)."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    first = tuple(calibration[0])
    prepared = prepare_pt2e(torch.export.export(model, first, strict=False).module(), quantizer)
    with torch.no_grad():
        for batch in calibration:
            prepared(*batch)
    return torch.export.export(convert_pt2e(prepared), first, strict=False)


def _qparams(node: fx.Node) -> tuple[Any, ...]:
    return tuple(node.args[1:3])


def layout_census(graph: fx.Graph) -> dict[str, int]:
    """Quantized products, transposes, views, copies, requantizations and broken islands of a quantized graph."""
    nodes = [n for n in graph.nodes if n.op == "call_function"]
    names = [op_name(n.target) for n in nodes]
    layout = (*_TRANSPOSES, *VIEWS)
    broken = sum(
        op_name(a.target) in layout and is_dequantize(a.args[0])
        for n in nodes
        if op_name(n.target) in _PRODUCTS
        for a in n.all_input_nodes
    )
    requant = 0
    for q in (n for n in nodes if is_quantize(n)):
        x = q.args[0]  # a quantize passing a one-input op on with its input's own qparams sets none of its own
        src = x.args[0] if isinstance(x, fx.Node) and x.op == "call_function" and x.args else None
        requant += not (isinstance(src, fx.Node) and is_dequantize(src) and _qparams(src) == _qparams(q))
    return {
        "quantized products": sum(
            op_name(n.target) in _PRODUCTS and any(is_dequantize(a) for a in n.all_input_nodes) for n in nodes
        ),
        "transposes": sum(n in _TRANSPOSES for n in names),
        "views": sum(n in VIEWS for n in names),
        "copies": sum(n in _COPIES for n in names),
        "requantizations": requant,
        "broken islands": broken,
    }


def lowered_outputs(program: torch.export.ExportedProgram, inputs: tuple) -> list[torch.Tensor] | str:
    """The outputs of ``program`` lowered with ExecuTorch's XNNPACK partitioner and run as a ``.pte``, or why not."""
    try:
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.exir import to_edge_transform_and_lower
    except ImportError:
        return "ExecuTorch is not installed (pip install 'fxsurgery[executorch]')"
    try:
        pte = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()]).to_executorch().buffer
        return [t for t in execute(pte, inputs) if isinstance(t, torch.Tensor)]
    except Exception as e:
        return f"does not lower: {one_line(e)[:200]}"


def _float_leaves(out: Any) -> list[torch.Tensor]:
    leaves = pytree.tree_leaves(out)
    return [t.detach().float() for t in leaves if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _output_steps(program: torch.export.ExportedProgram) -> list[float]:
    """The quantization step of each float output (nan where an output is not dequantized from int8)."""
    out = next(n for n in program.graph.nodes if n.op == "output").args[0]
    leaves = [n for n in pytree.tree_leaves(out) if isinstance(n, fx.Node) and _is_float(n)]
    return [float(n.args[1]) if is_dequantize(n) and isinstance(n.args[1], float) else math.nan for n in leaves]


def _is_float(node: fx.Node) -> bool:
    value = node.meta.get("val")
    return isinstance(value, torch.Tensor) and value.is_floating_point()


def _error(got: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    """The relative L2 error of ``got`` against ``ref``, over all leaves."""
    num = sum(float((g.double() - r.double()).pow(2).sum()) for g, r in zip(got, ref))
    den = sum(float(r.double().pow(2).sum()) for r in ref)
    return math.sqrt(num / max(den, 1e-30))


@dataclass
class QuantizedCheck:
    """Both versions quantized with one recipe, compared (see the module's text)."""

    recipe: str
    within_one_step: float | None  # None: no output is dequantized from int8
    identical: float
    error: dict[str, float]  # against the float original, by NAMES
    census: dict[str, dict[str, int]]  # layout_census, by NAMES
    lowering: str
    onnx_error: dict[str, float] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    def summary(self) -> str:
        a, b = self.census["original"], self.census["rewritten"]
        lines = [
            f"quantized cross-check ({self.recipe}): {'passed' if self.passed else 'FAILED'}",
            f"  int8 outputs: {_share(self.within_one_step)} within one step of the original's, "
            f"{self.identical:.1%} identical",
            f"  error against the float original: {_pair(self.error)}",
            *(f"  {k}: {a[k]} -> {b[k]}" for k in ("requantizations", "broken islands", "transposes", "views")),
            f"  XNNPACK: {self.lowering}",
        ]
        if self.onnx_error:
            lines.append(f"  onnxruntime static QDQ, error against the float original: {_pair(self.onnx_error)}")
        lines += [f"  skipped: {s}" for s in self.skipped] + [f"  FAILURE: {f}" for f in self.failures]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "recipe": self.recipe,
            "within_one_step": self.within_one_step,
            "identical": self.identical,
            "error": self.error,
            "census": self.census,
            "lowering": self.lowering,
            "onnx_error": self.onnx_error,
            "failures": self.failures,
            "skipped": self.skipped,
        }


def _share(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1%}"


def _pair(errors: dict[str, float]) -> str:
    a, b = errors["original"], errors["rewritten"]
    return f"original {a:.4g}, rewritten {b:.4g} ({b / a - 1 if a else 0.0:+.1%})"


def compare_quantized(
    original: nn.Module,
    rewritten: nn.Module,
    inputs: tuple,
    recipe: Any,
    onnx_paths: dict[str, Path] | None = None,
    seed: int = 0,
) -> QuantizedCheck:
    """Quantize ``original`` and ``rewritten`` with ``recipe`` (``"int8"`` or a PT2E quantizer), calibrated on
    ``inputs`` and one random batch like them, and compare them on fresh batches; with ``onnx_paths`` (the
    cross-check's files) also quantize those with onnxruntime's static QDQ and compare their errors."""
    name, quantizer = quantizer_of(recipe)
    original, rewritten = eval_copy(original), eval_copy(rewritten)  # PT2E folds and observes: never the user's
    g = torch.Generator().manual_seed(seed)
    calibration = [inputs, random_inputs(inputs, g)]
    fresh = [random_inputs(inputs, g) for _ in range(_FRESH)]
    programs = {n: quantize_pt2e(m, quantizer, calibration) for n, m in zip(NAMES, (original, rewritten))}
    with torch.no_grad():
        ref = [_float_leaves(original(*x)) for x in fresh]
        got = {n: [_float_leaves(p.module()(*x)) for x in fresh] for n, p in programs.items()}
    steps = _output_steps(programs["original"])
    pairs = [(a, b, s) for xa, xb in zip(got["original"], got["rewritten"]) for a, b, s in zip(xa, xb, steps)]
    stepped = [(a, b, s) for a, b, s in pairs if math.isfinite(s)]
    total = sum(a.numel() for a, _, _ in pairs) or 1
    report = QuantizedCheck(
        recipe=name,
        within_one_step=sum(int(((a - b).abs() <= s * 1.001).sum()) for a, b, s in stepped)
        / max(sum(a.numel() for a, _, _ in stepped), 1)
        if stepped
        else None,
        identical=sum(int((a == b).sum()) for a, b, _ in pairs) / total,
        error={n: _error([t for x in got[n] for t in x], [t for x in ref for t in x]) for n in NAMES},
        census={n: layout_census(p.graph) for n, p in programs.items()},
        lowering="",
    )
    report.lowering, lowers_worse = _lowering(programs, fresh[0])
    if lowers_worse:
        report.failures.append(f"the original lowers to XNNPACK and the rewritten model does not: {report.lowering}")
    if onnx_paths is not None:
        report.onnx_error = _onnx_errors(onnx_paths, calibration, fresh, ref, report)
    _judge(report)
    return report


def _lowering(programs: dict[str, torch.export.ExportedProgram], inputs: tuple) -> tuple[str, bool]:
    """Whether both programs lower to XNNPACK and their ``.pte`` outputs agree; True where only the original lowers."""
    outs = {n: lowered_outputs(p, inputs) for n, p in programs.items()}
    a, b = outs["original"], outs["rewritten"]
    if isinstance(a, str) and a.startswith("ExecuTorch is not"):
        return a, False
    if isinstance(a, str) or isinstance(b, str):
        text = "; ".join(f"{n}: {'lowers' if isinstance(o, list) else o}" for n, o in outs.items())
        return text, isinstance(b, str) and not isinstance(a, str)
    diff = max((float((x - y).abs().max()) for x, y in zip(a, b)), default=0.0)
    return "both lower; .pte outputs " + ("identical" if diff == 0 else f"differ by up to {diff:.3g}"), False


def _judge(report: QuantizedCheck) -> None:
    """The failures: what the rewrite added that quantized deployment pays for."""
    a, b = report.census["original"], report.census["rewritten"]
    why = {"requantizations": "each rounds the values again", "broken islands": "int8 lowering rejects them"}
    for key in why:
        if b[key] > a[key]:
            report.failures.append(f"the rewrite adds {b[key] - a[key]} {key} ({a[key]} -> {b[key]}): {why[key]}")
    if report.within_one_step is not None and report.within_one_step < AGREEMENT:
        report.failures.append(
            f"{report.within_one_step:.1%} of the int8 outputs are within one step of the original's "
            f"(at least {AGREEMENT:.0%} expected)"
        )
    for label, errors in (("PT2E", report.error), ("onnxruntime QDQ", report.onnx_error)):
        if errors and errors["rewritten"] > errors["original"] * (1 + ERROR_MARGIN) + 1e-7:
            report.failures.append(f"{label}: error against the float original grows: {_pair(errors)}")


def _onnx_errors(
    paths: dict[str, Path],
    calibration: list[tuple],
    fresh: list[tuple],
    ref: list[list[torch.Tensor]],
    report: QuantizedCheck,
) -> dict[str, float]:
    """Each ONNX file quantized with onnxruntime's static QDQ (after ``quant_pre_process``), beside it as
    ``<name>.int8.onnx``, and its error against the float original on ``fresh``; a file that cannot be quantized
    is a failure (the rewritten one) or a skip (the original)."""
    errors = {}
    for name in NAMES:
        try:
            quantized = _quantize_onnx(paths[name], calibration)
        except Exception as e:
            message = f"onnxruntime cannot quantize {paths[name].name}: {one_line(e)[:300]}"
            (report.failures if name == "rewritten" else report.skipped).append(message)
            return {}
        errors[name] = _error([t for x in fresh for t in _run_onnx(quantized, x)], [t for x in ref for t in x])
    return errors


@contextlib.contextmanager
def _in_folder(folder: Path) -> Iterator[None]:
    """The working directory ``folder`` while the block runs, the caller's again after."""
    before = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(before)


def _quantize_onnx(path: Path, calibration: list[tuple]) -> Path:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    path = path.resolve()
    pre, out = path.with_suffix(".pre.onnx"), path.with_suffix(".int8.onnx")
    with _in_folder(path.parent):  # it writes sym_shape_infer_temp.onnx and <uuid>.data in the working directory
        try:  # symbolic shape inference and onnxruntime's graph optimisations
            quant_pre_process(str(path), str(pre))
        except Exception:  # its symbolic inference gives up on some dynamic axes (transformers' Min(512, sequence))
            quant_pre_process(str(path), str(pre), skip_symbolic_shape=True)
    for leftover in path.parent.glob("*.data"):  # (the temporary's external data, which it leaves behind)
        if leftover.stem.count("-") == 4:
            leftover.unlink()
    (path.parent / "sym_shape_infer_temp.onnx").unlink(missing_ok=True)
    names = [i.name for i in session(pre).get_inputs()]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{k: t.numpy() for k, t in zip(names, batch)} for batch in calibration])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    quantize_static(
        str(pre),
        str(out),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )
    pre.unlink()
    return out


def _run_onnx(path: Path, inputs: tuple) -> list[torch.Tensor]:
    outs = run_session(session(path), inputs)
    return [torch.from_numpy(np.asarray(o)).float() for o in outs if np.issubdtype(np.asarray(o).dtype, np.floating)]
