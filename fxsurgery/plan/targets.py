"""Deployment targets: ``target=`` (CLI ``--target``) picks the layouts and leaves alone the patterns a toolchain runs
badly, each choice stated in the result's notes with its reason; :func:`fxsurgery.runtimes.census.census` counts
the ops after the target's own conversion, where its toolchain is installed.

* ``onnxruntime``: the defaults (they were measured on it: ``benchmarks/results.md``).
* ``openvino``: the defaults: at batch 1 neither layout is faster on its CPU plugin (ResNet-18, VGG-11: 0.97-1.01,
  noise 1.00-1.01; ``python -m benchmarks.openvino_layouts``).
* ``coreml``: ``batch_layout="batch"``: at batch 1 the spatial ``(1, C, 1, N)`` layout adds 2 transposes and 2
  reshapes around a head in Core ML; ``(N, C, 1, 1)`` adds 1 reshape.
* ``executorch-xnnpack``: ``batch_layout="batch"``, because its models are quantized after the rewrite and PT2E
  requantizes the spatial layout's transposes (``python -m benchmarks.quantized``); ``conv1x1-strided`` sites left
  as convs: XNNPACK does not delegate the
  ``x[:, :, ::s, ::s]`` slice they become (ResNet-18 conv -> Linear splits into 4 delegates and 6 ``slice_copy``;
  the original: 1 delegate).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fxsurgery.errors import InputError
from fxsurgery.rules.conv_to_linear.strided_pointwise import PATTERN as STRIDED_POINTWISE
from fxsurgery.runtimes.registry import RUNTIMES, Runtime

__all__ = ["Target", "TARGETS", "check_target", "target_notes", "target_skips"]


@dataclass(frozen=True)
class Target:
    """What a target changes: the batch layout of rewritten heads (None: the default), and patterns left alone,
    with the reason each is. Its name, toolchain and extra are its runtime's (:mod:`fxsurgery.runtimes.registry`)."""

    runtime: Runtime
    batch_layout: str | None = None
    layout_reason: str = ""
    skip: Mapping[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.runtime.target or self.runtime.name

    @property
    def toolchain(self) -> str:
        return self.runtime.package


#: Per runtime that is a deployment target, what it changes.
_CHOICES: dict[str, dict[str, Any]] = {
    "onnxruntime": {"layout_reason": "the defaults were measured on it"},
    "openvino": {"layout_reason": "at batch 1 neither layout measured faster on its CPU plugin"},
    "coreml": {
        "batch_layout": "batch",
        "layout_reason": "at batch 1 Core ML runs the spatial (1, C, 1, N) layout with 2 transposes and 2 "
        "reshapes around a head; (N, C, 1, 1) needs 1 reshape",
    },
    "executorch": {
        "batch_layout": "batch",
        "layout_reason": "its models are quantized after the rewrite (PT2E), and PT2E's XNNPACKQuantizer requantizes "
        "the spatial (1, C, 1, N) layout's transposes: 6 more quantizes on the demo model, within 1 LSB of the "
        "quantized original on 95% of outputs; (N, C, 1, 1) adds none, 100% (python -m benchmarks.quantized)",
        "skip": {
            STRIDED_POINTWISE: "target executorch-xnnpack: XNNPACK does not delegate the strided slice "
            "x[:, :, ::s, ::s] this rewrite starts with (the graph would split into several "
            "delegates with slice_copy between them): kept as a conv"
        },
    },
}

TARGETS: dict[str, Target] = {
    r.target: Target(r, **_CHOICES.get(r.name, {})) for r in RUNTIMES.values() if r.target is not None
}


def check_target(name: str | None) -> None:
    if name is not None and name not in TARGETS:
        raise InputError(f"target must be one of {sorted(TARGETS)} (or None), got {name!r}")


def target_skips(name: str | None) -> Mapping[str, str]:
    """Pattern -> reason, for the patterns the target leaves alone."""
    return TARGETS[name].skip if name else {}


def target_notes(name: str | None, batch_layout: str, direction: str) -> list[str]:
    """The target's choices for one pass, each with its reason."""
    if not name:
        return []
    t = TARGETS[name]
    notes = []
    if direction == "linear_to_conv":
        picked = t.batch_layout or "spatial"
        if batch_layout == picked:
            notes.append(f"target {name}: batch_layout={picked!r} ({t.layout_reason})")
        else:
            notes.append(
                f"target {name}: batch_layout={batch_layout!r} as given (the target picks {picked!r}: "
                f"{t.layout_reason})"
            )
    for pattern in t.skip:
        notes.append(f"target {name}: {pattern} sites are left alone")
    return notes
