"""``torch.export.ExportedProgram`` in and out: a program given instead of a model is rewritten through the export
front end, and the rewritten model is exported again (same dynamic batch) for the caller."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
from torch import nn

from fxsurgery.capture import export_model, working_copy
from fxsurgery.errors import InputError, one_line

__all__ = ["module_of_program", "export_rewritten"]

aten = torch.ops.aten

# nn_module_stack class names -> the torch.nn layer rebuilt from the recorded op
_LAYERS = {
    "torch.nn.modules.linear.Linear": (aten.linear.default,),
    "torch.nn.modules.conv.Conv2d": (aten.conv2d.default,),
    "torch.nn.modules.conv.Conv1d": (aten.conv1d.default,),
    "torch.nn.modules.normalization.LayerNorm": (aten.layer_norm.default,),
}


def module_of_program(program: Any) -> nn.Module:
    """``program.module()`` (a GraphModule of ATen ops whose submodules only hold parameters), with every layer an
    op was recorded in (``nn_module_stack``: Linear, Conv1d/2d, LayerNorm) rebuilt as that ``torch.nn`` layer around
    the same parameters, so the export front end raises its ops back to calls of these layers."""
    if not isinstance(program, torch.export.ExportedProgram):
        raise InputError(f"expected a torch.export.ExportedProgram, got {type(program).__name__}")
    module = program.module()
    for node in program.graph.nodes:
        stack = node.meta.get("nn_module_stack") or {}
        if node.op != "call_function" or not stack:
            continue
        path, kind = list(stack.values())[-1][:2]
        path = str(path).removeprefix("L['self'].")
        if node.target not in _LAYERS.get(str(kind), ()) or not _has(module, path):
            continue
        holder = module.get_submodule(path)
        if not isinstance(holder, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.LayerNorm)):
            module.set_submodule(path, _rebuild(node, holder))
    return module


def _has(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
    except AttributeError:
        return False
    return hasattr(module.get_submodule(path), "weight")


def _rebuild(node: fx.Node, holder: nn.Module) -> nn.Module:
    """The layer ``node`` computes, built on the meta device and given ``holder``'s parameters."""
    weight: Any = holder.weight
    bias: Any = getattr(holder, "bias", None)
    args: list[Any] = list(node.args)
    layer: Any
    if node.target is aten.linear.default:
        layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    elif node.target is aten.layer_norm.default:
        eps = args[4] if len(args) > 4 else 1e-5
        layer = nn.LayerNorm(list(args[1]), eps=eps, bias=bias is not None, device="meta")
    else:
        cls = nn.Conv2d if node.target is aten.conv2d.default else nn.Conv1d
        settings = [*args[3:7], *[None] * (4 - len(args[3:7]))]  # stride, padding, dilation, groups
        stride, padding, dilation, groups = (s if s is not None else d for s, d in zip(settings, (1, 0, 1, 1)))
        layer = cls(
            weight.shape[1] * groups,
            weight.shape[0],
            tuple(weight.shape[2:]),
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            bias=bias is not None,
            device="meta",
        )
    layer.weight = weight
    if bias is not None:
        layer.bias = bias
    _keep_the_rest(holder, layer)
    return layer


def _keep_the_rest(holder: nn.Module, layer: nn.Module) -> None:
    """Every parameter, buffer, child and plain attribute of ``holder`` that ``layer`` lacks (a folded BatchNorm's
    bias that a quantization flow keeps on the conv's holder), so that the graph's reads of them still resolve."""
    for name, p in holder.named_parameters(recurse=False):
        if not hasattr(layer, name):
            layer.register_parameter(name, p)
    for name, b in holder.named_buffers(recurse=False):
        if not hasattr(layer, name):
            layer.register_buffer(name, b, persistent=name not in holder._non_persistent_buffers_set)
    for name, child in holder.named_children():
        if not hasattr(layer, name):
            layer.add_module(name, child)
    for name, value in vars(holder).items():
        if not name.startswith("_") and not hasattr(layer, name):
            setattr(layer, name, value)


def export_rewritten(
    module: nn.Module,
    program: torch.export.ExportedProgram,
    inputs: tuple[torch.Tensor, ...],
    keywords: tuple[str, ...] = (),
) -> tuple[torch.export.ExportedProgram, list[str]]:
    """The rewritten model as an ExportedProgram that is a drop-in for ``program``: the same call (the last
    ``keywords`` inputs by name) and every dim dynamic that ``program`` has dynamic. Returns it and notes: a dim the
    rewritten graph cannot keep dynamic is exported static, and said."""
    n = len(inputs) - len(keywords)
    args, kwargs = inputs[:n], dict(zip(keywords, inputs[n:]))
    dims = _dynamic_dims(program, len(inputs))
    names = _parameter_names(module, len(inputs))
    if dims is None or names is None:  # an input structure this cannot map: the dynamic batch, as the front end's
        return export_model(working_copy(module).eval(), inputs), []
    spec = {name: dict.fromkeys(ds, torch.export.Dim.DYNAMIC) or None for name, ds in zip(names, dims)}
    try:
        return _export(module, args, kwargs, spec), []
    except Exception as e:
        spec = {name: dict.fromkeys(ds, torch.export.Dim.AUTO) or None for name, ds in zip(names, dims)}
        try:
            out = _export(module, args, kwargs, spec)
        except Exception:  # as the front end exports: a dynamic batch, positional inputs (its error is a TraceError)
            return export_model(working_copy(module).eval(), inputs), [
                f"the rewritten program takes its inputs positionally ({one_line(e)[:160]})"
            ]
        kept = _dynamic_dims(out, len(inputs)) or []
        lost = [f"{name} dim {d}" for name, ds, ks in zip(names, dims, kept) for d in ds if d not in ks]
        return out, [
            f"the rewritten program keeps static what the given program had dynamic ({', '.join(lost)}): "
            f"the rewritten graph fixes those sizes ({one_line(e)[:160]})"
        ] if lost else []


def _export(module: nn.Module, args: tuple, kwargs: dict[str, Any], spec: dict[str, Any]) -> Any:
    return torch.export.export(
        working_copy(module).eval(), args, kwargs=kwargs or None, dynamic_shapes=spec, strict=False
    )


def _dynamic_dims(program: torch.export.ExportedProgram, n: int) -> list[list[int]] | None:
    """Per user input of ``program``, the dims it has dynamic (None where its inputs are not ``n`` tensors)."""
    users = set(program.graph_signature.user_inputs)
    vals = [node.meta.get("val") for node in program.graph.nodes if node.op == "placeholder" and node.name in users]
    if len(vals) != n or not all(isinstance(v, torch.Tensor) for v in vals):
        return None
    return [[d for d, size in enumerate(v.shape) if isinstance(size, torch.SymInt)] for v in vals]


def _parameter_names(module: nn.Module, n: int) -> list[str] | None:
    """The names of the first ``n`` parameters of ``module.forward``, which a dynamic-shapes spec is keyed by."""
    import inspect

    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    named = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return named[:n] if len(named) >= n else None
