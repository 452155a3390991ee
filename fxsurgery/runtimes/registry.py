"""Every runtime, named once: what users call it (``runtime=``, ``runtimes=``, ``--cross-check-runtimes``), its name
as a deployment target (``target=``), the package and extra it needs, and what it offers the rest of fxsurgery:

* ``run``: convert a model and run it once (the cross-check, and the localization of a wrong output);
* ``time``: a callable that runs a converted model once (``to="auto"``, ``fxsurgery bench``);
* ``census``: the ops left after the toolchain's own conversion (``target=`` in ``check``).

The code of each lives in one module (:mod:`.ort`, :mod:`.eager`, :mod:`.openvino_cpu`, :mod:`.xnnpack`,
:mod:`.coreml`), as one :class:`Backend`; it is imported when first used, so that naming a runtime costs nothing.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fxsurgery.errors import InputError

__all__ = ["Runtime", "Backend", "RUNTIMES", "CAPABILITIES", "named", "get", "of_target", "run"]

CAPABILITIES = ("run", "time", "census")


class Backend:
    """What a runtime does, one method per capability; a runtime overrides those it offers. ``module`` is an
    eval-mode copy the backend may change, ``inputs`` tensors of its own."""

    def run(self, module: Any, inputs: tuple[Any, ...]) -> list[Any]:
        """``module`` converted and run once on ``inputs``: its outputs, flat."""
        raise NotImplementedError

    def timer(self, module: Any, inputs: tuple[Any, ...], workdir: Path, threads: int, exporter: str) -> Callable:
        """A zero-argument callable that runs ``module`` converted for this runtime once on ``inputs``."""
        raise NotImplementedError

    def census(
        self, module: Any, inputs: tuple[Any, ...], onnx_path: str | None, save: Path | None = None
    ) -> dict[str, int]:
        """The op types, with counts, of ``module`` after this toolchain's conversion (``onnx_path``: the model's ONNX
        file where one was written); with ``save``, that conversion also written there, as the toolchain's own
        export would write it (the path's suffix is the runtime's ``artifact``)."""
        raise NotImplementedError


@dataclass(frozen=True)
class Runtime:
    name: str  # what users call it
    label: str  # how its outputs are labelled in comparisons
    package: str  # the Python package it needs
    extra: str  # pip install "fxsurgery[extra]"; "": installed with fxsurgery
    backend: str  # "module:Class" of its Backend, imported when first used
    offers: frozenset[str]
    target: str | None = None  # its name as a deployment target; None where it is not one
    artifact: str = ""  # the suffix of the file its toolchain deploys (".pte"); "": none beyond the ONNX file

    def available(self) -> bool:
        return importlib.util.find_spec(self.package) is not None

    def install_hint(self) -> str:
        return f'pip install "fxsurgery[{self.extra}]"' if self.extra else f"pip install {self.package}"

    def impl(self) -> Backend:
        module, cls = self.backend.split(":")
        return getattr(importlib.import_module(module), cls)()


def _r(
    name: str,
    label: str,
    package: str,
    extra: str,
    backend: str,
    offers: str,
    target: str | None = None,
    artifact: str = "",
) -> Runtime:
    return Runtime(
        name, label, package, extra, f"fxsurgery.runtimes.{backend}", frozenset(offers.split()), target, artifact
    )


RUNTIMES: dict[str, Runtime] = {
    r.name: r
    for r in (
        _r("onnxruntime", "ORT", "onnxruntime", "", "ort:OnnxRuntime", "time census", target="onnxruntime"),
        _r("torch", "torch", "torch", "", "eager:Eager", "time"),
        _r(
            "openvino",
            "OpenVINO",
            "openvino",
            "openvino",
            "openvino_cpu:OpenVINO",
            "run time census",
            "openvino",
            ".xml",
        ),
        _r(
            "executorch",
            "ExecuTorch-XNNPACK",
            "executorch",
            "executorch",
            "xnnpack:Xnnpack",
            "run census",
            target="executorch-xnnpack",
            artifact=".pte",
        ),
        _r("coreml", "Core ML", "coremltools", "coreml", "coreml:CoreML", "census", "coreml", ".mlpackage"),
    )
}


def named(capability: str) -> tuple[str, ...]:
    """The runtimes that offer ``capability``, by the name users give."""
    return tuple(name for name, r in RUNTIMES.items() if capability in r.offers)


def get(name: str, capability: str, what: str) -> Runtime:
    """The runtime ``name`` for ``what`` (e.g. "timing"), checked: one that does not offer ``capability``, or is not
    installed, is an :class:`~fxsurgery.InputError` that says which would and how to install it."""
    runtime = RUNTIMES.get(name)
    if runtime is None or capability not in runtime.offers:
        raise InputError(f"unknown {what} runtime {name!r}: use one of {', '.join(named(capability))}")
    if not runtime.available():
        raise InputError(f"{what} on {runtime.label} needs {runtime.package}: {runtime.install_hint()}")
    return runtime


def of_target(target: str) -> Runtime:
    """The runtime whose toolchain a deployment target converts with."""
    return next(r for r in RUNTIMES.values() if r.target == target)


def run(name: str, module: Any, inputs: tuple[Any, ...]) -> list[Any]:
    """``module`` (in eval mode) converted for the runtime ``name`` and run once on copies of ``inputs``: its
    outputs, flat."""
    return RUNTIMES[name].impl().run(module, tuple(t.clone() for t in inputs))
