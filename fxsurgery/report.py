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
    "regressed",
    "SCHEMA_VERSION",
    "HISTOGRAM_BINS",
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
    calls: int = 1  # the calls of the layer rewritten as the new one (a shared layer's: more than one)
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
            "calls": self.calls,
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
    #: what makes a pass hollow ("" when nothing does): outputs below the comparison floor
    warning: str = ""

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
        if self.warning:
            text += f"\n  WARNING: {self.warning}"
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
            "warning": self.warning,
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

    def unchanged(self, dry_run: bool = False) -> str:
        """One line saying that no site was rewritten, or would be (``dry_run``); "" when some were."""
        if self.rewritten:
            return ""
        found = f"{len(self.sites)} candidate(s), each skipped with its reason" if self.sites else "no candidate found"
        said = "would be rewritten" if dry_run else "was rewritten"
        return f"nothing {said} ({found}): the model {'would stay' if dry_run else 'is'} unchanged"

    def summary(self, dry_run: bool = False) -> str:
        """The sites and the validation as text; ``dry_run``: the sites as what a rewrite would do."""
        n, k = len(self.rewritten), len(self.skipped)
        if dry_run:
            head = (
                f"fxsurgery {self.direction} (dry run: nothing validated, nothing written): would rewrite {n}, "
                f"would skip {k}"
            )
            status = {"rewritten": "would rewrite", "skipped": "would skip"}
        else:
            head = f"fxsurgery {self.direction}: {n} rewritten, {k} skipped"
            status = {"rewritten": "rewritten", "skipped": "skipped"}
        rows = [(s.name, s.pattern, status[s.status], s.after if s.rewritten else s.reason) for s in self.sites]
        lines = [head]
        if rows:
            lines.append(format_table(("site", "pattern", "status", "after / reason"), rows))
        lines.extend(f"note: {n}" for n in self.notes)
        if self.timings:
            rows = [
                (c["site"], c["direction"], c["chosen"], f"{c['ratio']:.2f}" if "ratio" in c else c.get("why", ""))
                for c in self.timings["sites"]
            ]
            if rows:
                lines.append(format_table(("site", "direction", "kept", "rewritten/original alone"), rows))
        if self.unchanged():
            lines.append(f"WARNING: {self.unchanged(dry_run)}")
        if not dry_run:
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
        lines += [f"skipped: {s}" for s in self.skipped]
        lines += ["FAILED: " + f.replace("\n", "\n  ") for f in self.failures]  # a toolchain's error, whole
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
        """Validation, the cross-check and the quantized comparison passed where they ran, and the target's
        toolchain converts the rewritten model wherever it converts the original."""
        quantized = self.quantized is None or self.quantized.passed
        converts = self.target is None or not regressed(self.target["census"])
        return self.surgery.passed and (self.onnx is None or self.onnx.passed) and quantized and converts

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


def regressed(census: dict[str, Any]) -> bool:
    """The toolchain converts the original and not the rewritten model (a target's census: the check fails)."""
    return census.get("original") is not None and census.get("rewritten") is None and "skipped" not in census


def _census_summary(target: dict[str, Any]) -> str:
    census = target["census"]
    head = f"target {target['name']}: op census after {census['toolchain']}'s conversion"
    if "skipped" in census:
        return f"{head}: not taken ({census['skipped']})"
    lines = [f"{head}: {census.get('verdict', '')}"]
    counts = {label: census[label] for label in ("original", "rewritten")}
    ops = sorted({op for c in counts.values() if c for op in c})
    if ops:
        rows = [(op, *("-" if c is None else c.get(op, 0) for c in counts.values())) for op in ops]
        lines.append(format_table(("op", "original", "rewritten"), rows))
    for label, text in census.get("errors", {}).items():
        lines.append(f"{census['toolchain']} on the {label} model:\n" + "\n".join(f"  {t}" for t in text.splitlines()))
    return "\n".join(lines)


#: The version of ``report.json``'s layout; raised when a key changes meaning or goes away.
SCHEMA_VERSION = 1
