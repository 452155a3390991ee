"""Result records: :class:`Site` (one candidate layer) and :class:`SurgeryResult` (one pass over a model)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch.fx as fx
from torch import nn

if TYPE_CHECKING:
    from fxsurgery.validation import Validation

__all__ = ["Site", "SurgeryResult", "format_table"]

Status = Literal["rewritten", "skipped"]


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

    def __post_init__(self) -> None:
        if self.status not in ("rewritten", "skipped"):
            raise ValueError(f"status must be 'rewritten' or 'skipped', got {self.status!r}")
        if self.status == "skipped" and not self.reason:
            raise ValueError(f"skipped site {self.name!r} needs a reason")

    @property
    def rewritten(self) -> bool:
        return self.status == "rewritten"

    def to_dict(self) -> dict[str, str]:
        return {
            "name": self.name,
            "pattern": self.pattern,
            "status": self.status,
            "reason": self.reason,
            "before": self.before,
            "after": self.after,
            "input_shape": None if self.input_shape is None else list(self.input_shape),
        }


@dataclass(frozen=True)
class SurgeryResult:
    """What :func:`fxsurgery.linear_to_conv` / :func:`fxsurgery.conv_to_linear` return.

    ``module`` is a ``torch.fx.GraphModule``; only when the root's own forward cannot be traced is it a copy of the
    root whose submodules were rewritten (``notes`` says so).
    """

    module: fx.GraphModule | nn.Module
    sites: list[Site]
    validation: Validation | None
    direction: str
    notes: tuple[str, ...] = field(default=())
    timings: dict[str, Any] | None = None  # to="auto": per-site and whole-model measurements and the choice

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
        rows = [
            (s.name, s.pattern, s.status, s.after if s.rewritten else s.reason) for s in self.sites
        ]
        lines = [head]
        if rows:
            lines.append(format_table(("site", "pattern", "status", "after / reason"), rows))
        else:
            lines.append("no candidate layers found")
        lines.extend(f"note: {n}" for n in self.notes)
        if self.timings:
            rows = [(c["site"], c["direction"], c["chosen"], f"{c['ratio']:.2f}" if "ratio" in c else c.get("why", ""))
                    for c in self.timings["sites"]]  # fmt: skip
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
            "sites": [s.to_dict() for s in self.sites],
            "notes": list(self.notes),
            "validation": None if self.validation is None else self.validation.to_dict(),
            "timings": self.timings,
        }


def format_table(header: tuple[str, ...], rows: list[tuple[Any, ...]]) -> str:
    """A plain-text table with columns padded to their widest cell."""
    cells = [tuple(str(c) for c in header)] + [tuple(str(c) for c in r) for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [fmt.format(*cells[0]), fmt.format(*("-" * w for w in widths))]
    out += [fmt.format(*r).rstrip() for r in cells[1:]]
    return "\n".join(out)
