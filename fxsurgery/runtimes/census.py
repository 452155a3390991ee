"""The op census after a deployment target's own conversion (:mod:`fxsurgery.plan.targets`), by its runtime's
``census`` (:mod:`fxsurgery.runtimes.registry`): what onnxruntime runs after its graph optimizations, the MIL ops
coremltools makes, OpenVINO's CPU execution graph, ExecuTorch's XNNPACK delegates and the ops left outside them;
and its verdict, one line: does the rewritten model convert where the original does, and does it keep as many ops
in the target's fast path. Each toolchain is optional: without it the census says so."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from fxsurgery.capture.copies import eval_copy
from fxsurgery.errors import full_text
from fxsurgery.progress import step
from fxsurgery.report import regressed
from fxsurgery.runtimes.registry import of_target

__all__ = ["census", "verdict"]


def census(
    name: str,
    original: nn.Module,
    rewritten: nn.Module,
    inputs: tuple[Any, ...],
    onnx_paths: tuple[str, str] | None = None,
    out_dir: Path | None = None,
) -> dict[str, Any]:
    """The ops of both models after the target ``name``'s own conversion: ``{"toolchain", "original", "rewritten",
    "errors", "verdict", "files"}``, a model the toolchain fails on ``None`` with the toolchain's whole error text in
    ``errors``; where the toolchain is not installed, ``{"toolchain", "skipped": why}``. With ``out_dir``, each
    conversion is also written there as the toolchain deploys it (``original.pte``, ``rewritten.pte``; OpenVINO IR
    ``.xml``/``.bin``; Core ML ``.mlpackage``), named in ``files``."""
    runtime = of_target(name)
    toolchain = runtime.package
    if not runtime.available():
        return {"toolchain": toolchain, "skipped": f"{toolchain} is not installed: {runtime.install_hint()}"}
    backend = runtime.impl()
    paths = onnx_paths or (None, None)
    out: dict[str, Any] = {"toolchain": toolchain, "errors": {}, "files": {}}
    for label, module, path in (("original", original, paths[0]), ("rewritten", rewritten, paths[1])):
        save = out_dir / f"{label}{runtime.artifact}" if out_dir is not None and runtime.artifact else None
        try:  # a census says what the toolchain made of the model; its failure is reported, not raised
            with step(f"converting the {label} model with {toolchain} (the target's op census)"):
                out[label] = backend.census(eval_copy(module), inputs, path, save)  # an eval copy: flags stay
            if save is not None:
                out["files"][label] = save.name
        except Exception as e:
            out[label] = None
            out["errors"][label] = full_text(e)
    out["verdict"] = verdict(out)
    return out


def _first_cause(text: str) -> str:
    """The line of a toolchain's error that names what failed (OpenVINO: ``-- Conversion is failed for: ...``)."""
    lines = text.splitlines()
    named = [line for line in lines if "failed for" in line or "not supported" in line.lower() or "aten::" in line]
    return (named or lines or [""])[-1].strip(" -")


def _transposes(ops: dict[str, int]) -> int:
    return sum(n for op, n in ops.items() if "transpose" in op.lower() or "permute" in op.lower())


def verdict(census: dict[str, Any]) -> str:
    """One line: the census judged (conversion of each model; then delegates and ops outside them where the target
    delegates, transposes, and the op count)."""
    if "skipped" in census:
        return f"not taken: {census['skipped']}"
    original, rewritten, errors = census["original"], census["rewritten"], census["errors"]
    if regressed(census):  # (the condition the check's outcome reads: SurgeryCheck.passed)
        return f"FAILED: the rewritten model does not convert ({_first_cause(errors['rewritten'])}); the original does"
    if rewritten is None:
        return f"neither model converts (the original fails as well: {_first_cause(errors['original'])})"
    if original is None:
        return f"the rewritten model converts; the original does not ({_first_cause(errors['original'])})"
    worse, parts = [], []
    if "delegate" in original or "delegate" in rewritten:
        outside = {k: v for k, v in rewritten.items() if k != "delegate"}
        outside_before = {k: v for k, v in original.items() if k != "delegate"}
        parts.append(f"delegates {original.get('delegate', 0)} -> {rewritten.get('delegate', 0)}")
        parts.append(f"ops outside them {sum(outside_before.values())} -> {sum(outside.values())}")
        if rewritten.get("delegate", 0) > original.get("delegate", 0):
            worse.append("more delegates (the graph is split)")
        added = {k: v - outside_before.get(k, 0) for k, v in outside.items() if v > outside_before.get(k, 0)}
        if added:
            worse.append("left outside the delegates: " + ", ".join(f"{k} +{v}" for k, v in sorted(added.items())))
    t0, t1 = _transposes(original), _transposes(rewritten)
    parts.append(f"transposes {t0} -> {t1}")
    if t1 > t0:
        worse.append(f"{t1 - t0} more transposes")
    parts.append(f"ops {sum(original.values())} -> {sum(rewritten.values())}")
    judged = f"worse: {'; '.join(worse)}" if worse else "ok"
    return f"{judged} ({', '.join(parts)})"
