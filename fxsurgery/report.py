"""Result records, with no work in them: :class:`Site`, :class:`SurgeryResult`, :class:`Validation`,
:class:`Comparison`, :class:`OnnxCheck` and :class:`CheckReport`.

Each is a frozen dataclass with ``summary()`` (text for people) and ``to_dict()`` (JSON-ready); the checks are truthy
when they passed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from torch import nn

if TYPE_CHECKING:
    from fxsurgery.verify.quantized import QuantizedCheck

__all__ = [
    "Site",
    "SurgeryResult",
    "Validation",
    "Comparison",
    "OnnxCheck",
    "CheckReport",
    "format_table",
    "json_float",
    "SCHEMA_VERSION",
    "HISTOGRAM_BINS",
    "moved",
    "report_file",
]

#: The bins of validation's error histograms, per element: |got - ref| / output scale, by decade (0: equal).
HISTOGRAM_BINS = ("0", "<1e-16", *(f"1e{e}..1e{e + 1}" for e in range(-16, 0)), ">=1")

Status = Literal["rewritten", "skipped"]


def json_float(x: float) -> float | str:
    """JSON has no inf/nan: those become strings."""
    return x if math.isfinite(x) else str(x)


def format_table(header: tuple[str, ...], rows: list[tuple[Any, ...]]) -> str:
    """A plain-text table with columns padded to their widest cell."""
    cells = [tuple(str(c) for c in header)] + [tuple(str(c) for c in r) for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [fmt.format(*cells[0]), fmt.format(*("-" * w for w in widths))]
    out += [fmt.format(*r).rstrip() for r in cells[1:]]
    return "\n".join(out)


@dataclass(frozen=True)
class Site:
    """One candidate layer the pass considered.

    ``name`` is the qualified module name (``classifier.0``) or, for functional calls, the graph node name.
    ``pattern`` names the rule; ``reason`` is non-empty exactly when ``status == "skipped"``.
    """

    name: str
    pattern: str
    status: Status
    reason: str = ""
    before: str = ""
    after: str = ""
    input_shape: tuple[int, ...] | None = None  # the map the rewritten layer reads, e.g. (N, C, H, W)
    direction: str = ""  # which pass considered it, where a result has both (``to="auto"``)
    # the site's neighbourhood before and after the pass (:mod:`fxsurgery.engine.subgraph`), for the drawings
    subgraph: Mapping[str, Any] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.status not in ("rewritten", "skipped"):
            raise ValueError(f"status must be 'rewritten' or 'skipped', got {self.status!r}")
        if self.status == "skipped" and not self.reason:
            raise ValueError(f"skipped site {self.name!r} needs a reason")

    @property
    def rewritten(self) -> bool:
        return self.status == "rewritten"

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "pattern": self.pattern,
            "status": self.status,
            "reason": self.reason,
            "before": self.before,
            "after": self.after,
            "input_shape": None if self.input_shape is None else list(self.input_shape),
            "direction": self.direction,
            "subgraph": self.subgraph,
        }


@dataclass(frozen=True)
class Validation:
    """Outcome of comparing a rewritten model with its original; truthy when it passed."""

    passed: bool
    max_abs_error: float
    max_rel_error: float
    rtol: float
    scale_floor: float
    num_inputs: int
    batch_sizes: tuple[int, ...]
    precision: str
    worst: str = ""
    failure: str = ""
    notes: tuple[str, ...] = field(default=())
    #: per output, element counts of |rewritten - original| / output scale per bin of ``HISTOGRAM_BINS``
    error_histograms: dict[str, list[int]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return self.passed

    def summary(self) -> str:
        verdict = "PASSED" if self.passed else "FAILED"
        text = (
            f"validation {verdict} ({self.precision}): {self.num_inputs} inputs, batch sizes "
            f"{', '.join(map(str, self.batch_sizes))}; max abs error {self.max_abs_error:.3g}, max error relative to "
            f"output scale {self.max_rel_error:.3g} (tolerance {self.rtol:.3g})"
        )
        if self.failure:
            text += f"\n  {self.failure}"
        for n in self.notes:
            text += f"\n  note: {n}"
        return text

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "max_abs_error": json_float(self.max_abs_error),
            "max_rel_error": json_float(self.max_rel_error),
            "rtol": self.rtol,
            "scale_floor": self.scale_floor,
            "num_inputs": self.num_inputs,
            "batch_sizes": list(self.batch_sizes),
            "precision": self.precision,
            "worst": self.worst,
            "failure": self.failure,
            "notes": list(self.notes),
            "error_histograms": {"bins": list(HISTOGRAM_BINS), "outputs": self.error_histograms},
        }


@dataclass(frozen=True)
class SurgeryResult:
    """What :func:`fxsurgery.linear_to_conv` / :func:`fxsurgery.conv_to_linear` / :func:`fxsurgery.rewrite` return.

    ``module`` is a ``torch.fx.GraphModule``; only when the root's own forward cannot be traced is it a copy of the
    root whose submodules were rewritten (``notes`` says so).
    """

    module: nn.Module
    sites: list[Site]
    validation: Validation | None
    direction: str
    notes: tuple[str, ...] = field(default=())
    timings: dict[str, Any] | None = None  # to="auto": per-site and whole-model measurements and the choice
    frontend: str = "fx"  # the front end that made the graph: "fx" or "export" (the notes say why)
    program: Any = None  # given an ExportedProgram: the rewritten model exported again (same dynamic batch)

    @property
    def rewritten(self) -> list[Site]:
        return [s for s in self.sites if s.rewritten]

    @property
    def skipped(self) -> list[Site]:
        return [s for s in self.sites if not s.rewritten]

    @property
    def passed(self) -> bool:
        """True unless validation ran and failed."""
        return self.validation is None or bool(self.validation)

    def summary(self) -> str:
        head = f"fxsurgery {self.direction}: {len(self.rewritten)} rewritten, {len(self.skipped)} skipped"
        rows = [(s.name, s.pattern, s.status, s.after if s.rewritten else s.reason) for s in self.sites]
        lines = [head]
        if rows:
            lines.append(format_table(("site", "pattern", "status", "after / reason"), rows))
        else:
            lines.append("no candidate layers found")
        lines.extend(f"note: {n}" for n in self.notes)
        if self.timings:
            rows = [
                (c["site"], c["direction"], c["chosen"], f"{c['ratio']:.2f}" if "ratio" in c else c.get("why", ""))
                for c in self.timings["sites"]
            ]
            if rows:
                lines.append(format_table(("site", "direction", "kept", "rewritten/original alone"), rows))
        lines.append(self.validation.summary() if self.validation is not None else "validation: not run")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "direction": self.direction,
            "passed": self.passed,
            "rewritten": len(self.rewritten),
            "skipped": len(self.skipped),
            "frontend": self.frontend,
            "sites": [s.to_dict() for s in self.sites],
            "notes": list(self.notes),
            "validation": None if self.validation is None else self.validation.to_dict(),
            "timings": self.timings,
        }


@dataclass(frozen=True)
class Comparison:
    """One pair of outputs compared: ``candidate`` against ``reference`` at one batch size."""

    reference: str
    candidate: str
    batch: int
    max_abs_error: float
    max_rel_error: float
    passed: bool
    failure: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "reference": self.reference,
            "candidate": self.candidate,
            "batch": self.batch,
            "max_abs_error": json_float(self.max_abs_error),
            "max_rel_error": json_float(self.max_rel_error),
            "passed": self.passed,
            "failure": self.failure,
        }


@dataclass(frozen=True)
class OnnxCheck:
    """Outcome of :func:`fxsurgery.cross_check`; truthy when every comparison passed and the rewrite is visible."""

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
            (
                c.candidate,
                c.reference,
                c.batch,
                f"{c.max_abs_error:.3g}",
                f"{c.max_rel_error:.3g}",
                "ok" if c.passed else "MISMATCH",
            )
            for c in self.comparisons
        ]
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


@dataclass(frozen=True)
class CheckReport:
    """A :class:`SurgeryResult` and the :class:`OnnxCheck` of the same rewrite; truthy when both passed."""

    surgery: SurgeryResult
    onnx: OnnxCheck | None
    target: dict[str, Any] | None = None  # {"name", "census"}: the target's census
    quantized: QuantizedCheck | None = None  # check(..., quantize=...): both versions quantized and compared

    @property
    def passed(self) -> bool:
        quantized = self.quantized is None or self.quantized.passed
        return self.surgery.passed and (self.onnx is None or self.onnx.passed) and quantized

    def __bool__(self) -> bool:
        return self.passed

    def summary(self) -> str:
        parts = [self.surgery.summary()]
        parts.append(self.onnx.summary() if self.onnx is not None else "ONNX cross-check: not run")
        if self.target is not None:
            parts.append(_census_summary(self.target))
        if self.quantized is not None:
            parts.append(self.quantized.summary())
        parts.append(f"overall: {'PASSED' if self.passed else 'FAILED'}")
        return "\n\n".join(parts)

    def to_dict(self) -> dict[str, Any]:
        d = self.surgery.to_dict()
        return {
            "passed": self.passed,
            "direction": d["direction"],
            "frontend": d["frontend"],
            "sites": d["sites"],
            "notes": d["notes"],
            "validation": d["validation"],
            "timings": d["timings"],
            "onnx": None if self.onnx is None else self.onnx.to_dict(),
            "target": self.target,
            "quantized": None if self.quantized is None else self.quantized.to_dict(),
        }


def _census_summary(target: dict[str, Any]) -> str:
    census = target["census"]
    head = f"target {target['name']}: op census after {census['toolchain']}'s conversion"
    if "skipped" in census:
        return f"{head}: not taken ({census['skipped']})"
    ops = sorted(set(census["original"]) | set(census["rewritten"]))
    rows = [(op, census["original"].get(op, 0), census["rewritten"].get(op, 0)) for op in ops]
    return f"{head}\n{format_table(('op', 'original', 'rewritten'), rows)}"


#: The version of ``report.json``'s layout; raised when a key changes meaning or goes away.
SCHEMA_VERSION = 1


def moved(
    report: CheckReport, folder: str | None, gone: str = "(removed: pass --out DIR to keep the files)"
) -> CheckReport:
    """``report`` with its ONNX paths in ``folder`` (where the CLI's staging folder ends up), or marked ``gone``
    when ``folder`` is None (``fxsurgery demo`` without ``--out``, ``--artifacts`` without ``onnx``)."""
    import dataclasses
    from pathlib import Path

    if report.onnx is None:
        return report

    def where(path: str) -> str:
        return str(Path(folder) / Path(path).name) if folder else gone

    onnx = dataclasses.replace(
        report.onnx, original_path=where(report.onnx.original_path), rewritten_path=where(report.onnx.rewritten_path)
    )
    return dataclasses.replace(report, onnx=onnx)


def report_file(
    report: CheckReport, *, saved: dict[str, str], command: str, inputs: list[tuple[str, Any]]
) -> dict[str, Any]:
    """What ``report.json`` (and ``--json``) holds: the report, the files saved, the command, the schema version,
    the versions of the tools, and the example inputs ``(name, tensor)`` as names, shapes and dtypes."""
    import importlib.metadata
    import sys

    versions: dict[str, str | None] = {}
    for package in ("fxsurgery", "torch", "onnx", "onnxruntime", "onnxscript", "transformers", "torchao"):
        loaded = getattr(sys.modules.get(package), "__version__", None)  # torch's carries its build: 2.14.1+cu130
        try:
            versions[package] = str(loaded) if loaded else importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "schema_version": SCHEMA_VERSION,
        **report.to_dict(),
        "saved": saved,
        "command": command,
        "versions": versions,
        "inputs": [
            {"name": name, "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")} for name, t in inputs
        ],
    }
