"""Checking what the caller passed: the example inputs and the model object."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
from torch import nn

from fxsurgery.errors import InputError, TraceError

__all__ = ["normalize_inputs", "prepare_model", "unwrap", "check_devices", "check_names"]


def normalize_inputs(example_inputs: Any) -> tuple[torch.Tensor, ...]:
    """Return ``example_inputs`` as a tuple of tensors, or raise :class:`InputError` saying what is wrong."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, list):
        example_inputs = tuple(example_inputs)
    if not isinstance(example_inputs, tuple) or not example_inputs:
        raise InputError(
            f"example_inputs must be a Tensor or a non-empty tuple of Tensors, got {type(example_inputs).__name__}"
        )
    for i, t in enumerate(example_inputs):
        if not isinstance(t, torch.Tensor):
            raise InputError(f"example_inputs[{i}] is a {type(t).__name__}, not a Tensor; pass tensors only")
    return example_inputs


def unwrap(model: Any) -> tuple[Any, list[str]]:
    """The module inside ``DataParallel``/``DistributedDataParallel``/``torch.compile`` wrappers, and notes saying
    which were removed."""
    notes = []
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            notes.append(f"unwrapped {type(model).__name__}: the module inside it was rewritten")
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
            notes.append("unwrapped torch.compile: the eager module was rewritten; compile the rewritten model again")
            model = model._orig_mod
        else:
            return model, notes


def prepare_model(model: Any) -> nn.Module:
    """Check that ``model`` can be traced faithfully and unwrap data-parallel and ``torch.compile`` wrappers."""
    if isinstance(model, torch.jit.ScriptModule):
        raise TraceError(
            "model is a TorchScript ScriptModule, which torch.fx cannot trace; pass the eager nn.Module it was "
            "scripted from",
            module="",
        )
    if not isinstance(model, nn.Module):
        raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    model = unwrap(model)[0]
    hooks = [
        kind
        for kind, d in (
            ("forward hooks", model._forward_hooks),
            ("forward pre-hooks", model._forward_pre_hooks),
        )
        if d
    ]
    if hooks and not isinstance(model, fx.GraphModule):
        raise TraceError(
            f"the root module has {' and '.join(hooks)}, which torch.fx drops when tracing; remove them before the "
            "rewrite (or wrap the model in a parent nn.Module so the hooks run inside the traced graph)",
            module="",
        )
    lazy = [
        name
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.lazy.LazyModuleMixin) and m.has_uninitialized_params()  # type: ignore[misc]
    ]
    if lazy:
        raise InputError(
            f"model has uninitialised lazy modules ({', '.join(lazy[:3])}); run one forward pass on a real input "
            "first so their shapes are known"
        )
    return model


def check_devices(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
    """The example inputs must be on the model's device (meta included)."""
    devices = {p.device.type for p in model.parameters()} | {b.device.type for b in model.buffers()}
    if len(devices) != 1:
        return
    (device,) = devices
    wrong = sorted({t.device.type for t in inputs} - {device})
    if wrong:
        where = "torch.empty(shape, device='meta')" if device == "meta" else f"x.to('{device}')"
        raise InputError(f"the example inputs are on {', '.join(wrong)} but the model's parameters are on {device}: "
                         f"pass inputs on the model's device ({where})")  # fmt: skip


def check_names(kind: str, names: Any, known: Any) -> None:
    """Every name in ``names`` must be one of ``known``; else an :class:`InputError` listing the nearest names."""
    import difflib

    known = sorted(set(known))
    for name in names:
        if isinstance(name, str) and name not in known:
            near = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
            hint = f"; nearest: {', '.join(near)}" if near else ""
            raise InputError(f"{kind} {name!r} matches no module or site of the model{hint}")
