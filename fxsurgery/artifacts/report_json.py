"""``report.json``: what :func:`fxsurgery.check` found, with the files saved, the command, the versions of the tools
and the example inputs (:func:`report_file`); and the report's paths once its folder moved (:func:`moved`)."""

from __future__ import annotations

from typing import Any

from fxsurgery.report import SCHEMA_VERSION, CheckReport

__all__ = ["moved", "report_file"]


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
