"""Checking what the caller passed: the example inputs and the model object."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
from torch import nn

from fxsurgery.errors import InputError, TraceError

__all__ = ["normalize_inputs", "prepare_model"]


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


def prepare_model(model: Any) -> nn.Module:
    """Check that ``model`` can be traced faithfully and unwrap data-parallel wrappers."""
    if isinstance(model, torch.jit.ScriptModule):
        raise TraceError(
            "model is a TorchScript ScriptModule, which torch.fx cannot trace; pass the eager nn.Module it was "
            "scripted from",
            module="",
        )
    if not isinstance(model, nn.Module):
        raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    while isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        model = model.module
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
