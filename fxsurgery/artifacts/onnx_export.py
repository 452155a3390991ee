"""ONNX export of a module (dynamo or TorchScript exporter, dynamic batch, external data past 2 GiB), and what the
exported file says: its op histogram, whether its batch axis stayed dynamic."""

from __future__ import annotations

import collections
import contextlib
import io
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fxsurgery.capture.inputs import is_tokens

__all__ = [
    "EXPORTERS",
    "export_onnx",
    "torchlib_registry_once",
    "op_histogram",
    "batch_is_dynamic",
    "sequence_is_dynamic",
    "io_names",
    "rename_outputs",
]

EXPORTERS = ("dynamo", "torchscript")
# Beyond this many parameter bytes a single protobuf (2 GiB limit) cannot hold the model: write external data.
_EXTERNAL_DATA_BYTES = 1_800_000_000


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
    input_names: list[str] | None = None,
    dynamic_sequence: bool = False,
) -> None:
    """Export ``module`` (in eval mode) to ``path`` with its inputs named ``input_names`` (default ``input_0``, ...);
    ``dynamic_sequence`` (with ``dynamic_batch``): dim 1 of token inputs (:func:`is_tokens`) named ``sequence``
    and dynamic. Raises the exporter's exception on failure."""
    names = list(input_names) if input_names else [f"input_{i}" for i in range(len(inputs))]
    big = sum(p.numel() * p.element_size() for p in module.parameters()) > _EXTERNAL_DATA_BYTES
    kwargs: dict[str, Any] = {"input_names": names, "verbose": False}
    if opset is not None:
        kwargs["opset_version"] = opset
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
            dyn = (
                tuple(
                    ({0: batch, 1: sequence} if dynamic_sequence and is_tokens(t) else {0: batch}) if t.dim() else None
                    for t in inputs
                )
                if dynamic_batch
                else None
            )
            with torchlib_registry_once():
                torch.onnx.export(
                    module, inputs, str(path), dynamo=True, dynamic_shapes=dyn, external_data=big, **kwargs
                )
        else:
            axes = (
                {
                    n: {0: "batch", 1: "sequence"} if dynamic_sequence and is_tokens(t) else {0: "batch"}
                    for n, t in zip(names, inputs)
                    if t.dim()
                }
                if dynamic_batch
                else None
            )
            _export_torchscript(module, inputs, path, axes, kwargs)


_REGISTRIES: dict[tuple[int, bool], Any] = {}


@contextlib.contextmanager
def torchlib_registry_once() -> Iterator[None]:
    """Build the dynamo exporter's op registry once per process and opset, not on every export.

    ``torch.onnx.export`` rebuilds onnxscript's whole torchlib registry each time (about 2,000 ops, each read with
    ``inspect``): 0.6-1.2 s of every export, more than the export of a small model itself. The registry depends only
    on the opset and on which op namespaces are loaded (torchvision's ops once torchvision is imported), so it is
    cached on those; each export gets its own shallow copy, as a custom translation table adds to it. This patches
    a private torch API for the duration of the export: where it is not there, exports run as they are.
    """
    try:
        from torch.onnx._internal.exporter import _registration
    except ImportError:  # pragma: no cover - another torch layout: no caching
        yield
        return
    cls = _registration.ONNXRegistry
    build = cls.__dict__.get("from_torchlib")
    if not isinstance(build, classmethod):  # pragma: no cover
        yield
        return

    def cached(klass: type, opset_version: int = _registration._constants.TORCHLIB_OPSET) -> Any:
        key = (opset_version, "torchvision" in sys.modules)
        if key not in _REGISTRIES:
            _REGISTRIES[key] = build.__func__(klass, opset_version)
        registry = klass()
        registry._opset_version = opset_version
        registry.functions = {k: list(v) for k, v in _REGISTRIES[key].functions.items()}
        return registry

    setattr(cls, "from_torchlib", classmethod(cached))  # noqa: B010 - a class attribute, restored below
    try:
        yield
    finally:
        setattr(cls, "from_torchlib", build)  # noqa: B010


def _export_torchscript(
    module: nn.Module, inputs: tuple[torch.Tensor, ...], path: Path, axes: Any, kwargs: dict[str, Any]
) -> None:
    """Past 2 GiB the TorchScript exporter writes one file per initializer beside the model, named like
    "onnx::Conv_497": two models exported into one folder would overwrite each other's weights. Export alone, then
    keep one data file per model."""
    wrapper = _Call(module).train(module.training)  # the exporter restores the wrapper's mode recursively
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        staged = Path(tmp) / "model.onnx"
        torch.onnx.export(wrapper, inputs, str(staged), dynamo=False, dynamic_axes=axes, **kwargs)
        if len(list(Path(tmp).iterdir())) == 1:
            os.replace(staged, path)
        else:
            import onnx

            onnx.save_model(
                onnx.load(str(staged)),
                str(path),
                save_as_external_data=True,
                all_tensors_to_one_file=True,
                location=f"{path.name}.data",
            )


def io_names(path: str | os.PathLike) -> tuple[list[str], list[str]]:
    """The input and output names of an ONNX file (weights not loaded)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return [i.name for i in graph.input], [o.name for o in graph.output]


def rename_outputs(path: str | os.PathLike, names: list[str]) -> None:
    """Give the graph outputs of an ONNX file ``names`` (the rewritten model's file takes the original's, so that
    code that looks outputs up by name works with either), renaming first any other value that has one of them (the
    exporters name values by op, "relu_2", or by number, "10": another graph uses those for something else). Weights
    kept in external files stay where they are."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    old = [o.name for o in graph.output]
    if old == names or len(old) != len(names):
        return
    subgraphs = any(
        a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for node in graph.node for a in node.attribute
    )
    if subgraphs or set(names) & {i.name for i in graph.input}:
        return  # (subgraphs read outer values by name; an output named like an input): left as exported
    mapping = dict(zip(old, names))
    taken = {v for node in graph.node for v in (*node.input, *node.output)} | {t.name for t in graph.initializer}
    for clash in (set(names) & taken) - set(old):
        mapping[clash] = f"{clash}__fxsurgery"  # an inner value that had an output's name
    for node in graph.node:
        node.input[:] = [mapping.get(v, v) for v in node.input]
        node.output[:] = [mapping.get(v, v) for v in node.output]
    for value in (*graph.output, *graph.value_info, *graph.initializer):
        value.name = mapping.get(value.name, value.name)
    onnx.save_model(model, str(path))


def op_histogram(path: str | os.PathLike) -> dict[str, int]:
    """Count the op types of an ONNX model's main graph."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return dict(sorted(collections.Counter(n.op_type for n in model.graph.node).items()))


def batch_is_dynamic(path: Path) -> bool:
    """Whether dim 0 of every graph input with dims is symbolic in the exported file."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    dims = [i.type.tensor_type.shape.dim for i in model.graph.input if i.type.tensor_type.shape.dim]
    return all(d[0].dim_param for d in dims)


def sequence_is_dynamic(path: Path, tokens: list[bool]) -> bool:
    """Whether dim 1 of every token input (``tokens``, per graph input) is symbolic in the exported file."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return all(bool(i.type.tensor_type.shape.dim[1].dim_param) for i, token in zip(model.graph.input, tokens) if token)
