"""The export stage of the cross-check (:mod:`fxsurgery.verify.cross_check`): both models exported to ONNX at the
most dynamic level both files keep (batch and sequence axes, batch, static), with the model's own input names
(``input_ids``) and output names (``logits``); then ``onnx.checker`` on both files."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fxsurgery.artifacts.onnx_export import batch_is_dynamic, export_onnx, io_names, rename_outputs, sequence_is_dynamic
from fxsurgery.errors import SurgeryError, one_line
from fxsurgery.progress import step
from fxsurgery.verify.validation import run_no_grad

__all__ = ["NAMES", "Findings", "Settings", "export_both", "check_files", "input_names", "output_names", "name_outputs"]

NAMES = ("original", "rewritten")


@dataclass
class Findings:
    """What the stages found that is not a comparison: limits (skipped) and failures."""

    inputs: tuple[torch.Tensor, ...]
    skipped: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def limit_or_fail(self, message: str) -> None:
        """Missing kernels for a dtype other than float32 are a reported limit, not a failure (onnxruntime CPU has
        no float64 Conv and no bfloat16 Gemm; ONNX allows bfloat16 Conv only from opset 22)."""
        dtypes = {t.dtype for t in self.inputs if t.is_floating_point()}
        if dtypes - {torch.float32}:
            names = ", ".join(sorted(str(d).removeprefix("torch.") for d in dtypes))
            self.skipped.append(f"{message} [dtype limit: {names}; bfloat16 Conv needs opset=22]")
        else:
            self.failures.append(message)


@dataclass(frozen=True)
class Settings:
    """How both files are exported: the exporter, the opset, the graph inputs' names, and which inputs are token
    inputs (their sequence axis may be dynamic)."""

    exporter: str
    opset: int | None
    names: list[str]
    tokens: list[bool]


def export_both(
    models: dict[str, nn.Module],
    paths: dict[str, Path],
    inputs: tuple[torch.Tensor, ...],
    export_inputs: tuple[torch.Tensor, ...],
    dynamic: bool,
    found: Findings,
    settings: Settings,
) -> str:
    """Export both models at the most dynamic level both files keep: ``"batch+sequence"`` (token inputs), ``"batch"``
    or ``"static"``; each level given up is said in ``found.skipped``. Returns the level."""
    levels = ["batch+sequence"] if dynamic and any(settings.tokens) else []
    levels += ["batch"] if dynamic else []
    for level in [*levels, "static"]:
        failed = ""
        for name, module in models.items():
            try:
                with step(f"exporting the {name} model to ONNX ({settings.exporter}, {level} axes)"):
                    export_onnx(
                        module,
                        _clones(inputs if level == "static" else export_inputs),
                        paths[name],
                        exporter=settings.exporter,
                        dynamic_batch=level != "static",
                        opset=settings.opset,
                        input_names=settings.names,
                        dynamic_sequence=level == "batch+sequence",
                    )
            except Exception as e:
                if level == "static":
                    raise _export_error(name, settings.exporter, e) from e
                failed = f"export failed ({one_line(e)})"
                break
        if not failed and level != "static":
            kept = [
                n
                for n, p in paths.items()
                if batch_is_dynamic(p) and (level == "batch" or sequence_is_dynamic(p, settings.tokens))
            ]
            failed = (
                ""
                if len(kept) == len(paths)
                else f"the exporter specialised it in {', '.join(sorted(set(paths) - set(kept)))}.onnx"
            )
        if not failed:
            return level
        axis, instead = (
            ("sequence", "a dynamic batch only") if level == "batch+sequence" else ("batch", "a static batch")
        )
        found.skipped.append(f"dynamic {axis} axis: {failed}; exported with {instead}")
    raise AssertionError("unreachable: the static export raises or returns")


def input_names(module: nn.Module, n: int) -> list[str]:
    """The names of ``module``'s first ``n`` forward parameters (``input_ids``, ``attention_mask``: the keyword
    inputs a HuggingFace model is called with), where they are ``n`` plain positional ones; else ``input_0``, ..."""
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        params = []
    names = [p.name for p in params[:n] if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return names if len(names) == n else [f"input_{i}" for i in range(n)]


def output_names(outputs: Any) -> list[str] | None:
    """The names of the tensors in ``outputs`` in the exporter's order, from their place in it: ``logits``,
    ``hidden_states.0``, ``output`` for a lone tensor; None where it holds something else than tensors, tuples,
    lists and mappings (a cache object)."""
    if isinstance(outputs, torch.Tensor):
        return ["output"]
    names: list[str] = []

    def walk(value: Any, path: str) -> bool:
        if isinstance(value, torch.Tensor):
            names.append(path)
            return True
        if isinstance(value, Mapping):
            items: Any = ((str(k), v) for k, v in value.items() if v is not None)
        elif isinstance(value, (list, tuple)):
            items = ((str(i), v) for i, v in enumerate(value))
        else:
            return False
        return all(walk(v, f"{path}.{k}" if path else k) for k, v in items)

    return names if walk(outputs, "") and len(set(names)) == len(names) else None


def name_outputs(original: nn.Module, inputs: tuple[torch.Tensor, ...], paths: dict[str, Path]) -> None:
    """Name both files' outputs after their place in the model's outputs (``logits``), where the counts agree; the
    rewritten file takes the original's names either way (a drop-in replacement)."""
    names = output_names(run_no_grad(original, _clones(inputs)))
    if names is not None and len(names) == len(io_names(paths["original"])[1]):
        rename_outputs(paths["original"], names)
    rename_outputs(paths["rewritten"], io_names(paths["original"])[1])


def _export_error(name: str, exporter: str, e: Exception) -> SurgeryError:
    other = "torchscript" if exporter == "dynamo" else "dynamo"
    return SurgeryError(
        f"ONNX export of the {name} model failed ({exporter}): {one_line(e)}; try "
        f"exporter={other!r} (--exporter {other}), or check(..., onnx=False) without the cross-check"
    )


def _clones(inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Exporters run the model on the inputs they are given: never on the caller's tensors."""
    return tuple(t.clone() for t in inputs)


def check_files(paths: dict[str, Path], found: Findings) -> None:
    import onnx

    for name, path in paths.items():
        try:
            onnx.checker.check_model(str(path), full_check=True)
        except Exception as e:
            found.limit_or_fail(f"onnx.checker rejects {name}.onnx: {one_line(e)}")
