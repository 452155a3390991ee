"""Checking what the caller passed: the example inputs and the model object."""

from __future__ import annotations

import copy
import inspect
import keyword
from collections.abc import Mapping
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch import nn

from fxsurgery.capture.quantized import refuse_observers
from fxsurgery.errors import InputError, TraceError

__all__ = [
    "normalize_inputs",
    "split_keywords",
    "keyword_call",
    "is_tokens",
    "prepare_model",
    "unwrap",
    "check_devices",
    "on_meta",
    "refuse_meta",
    "check_names",
]


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


def split_keywords(example_inputs: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """``(positional, keywords)`` of ``example_inputs``: a dict is all keyword inputs (``{"input_ids": ids,
    "attention_mask": mask}``), a tuple may end with one (``(ids, {"attention_mask": mask})``)."""
    if isinstance(example_inputs, Mapping):
        return (), _keywords(example_inputs)
    if isinstance(example_inputs, (tuple, list)) and example_inputs and isinstance(example_inputs[-1], Mapping):
        return tuple(example_inputs[:-1]), _keywords(example_inputs[-1])
    return example_inputs, {}


def _keywords(given: Mapping[Any, Any]) -> dict[str, torch.Tensor]:
    for k, v in given.items():
        if not isinstance(k, str) or not k.isidentifier() or keyword.iskeyword(k):
            raise InputError(f"keyword input names must be argument names of forward, got {k!r}")
        if not isinstance(v, torch.Tensor):
            raise InputError(
                f"keyword input {k!r} is a {type(v).__name__}, not a Tensor; pass tensors only (fix "
                "other arguments with functools.partial on a wrapper module)"
            )
    return dict(given)


def is_tokens(t: Any) -> bool:
    """A token input, whose dim 1 is the sequence: integer ids or a mask, ``(batch, sequence)``."""
    return isinstance(t, torch.Tensor) and t.dim() == 2 and not t.is_floating_point() and not t.is_complex()


def keyword_call(model: nn.Module, n_positional: int, names: tuple[str, ...]) -> nn.Module:
    """``model`` seen as a module whose forward takes every input positionally: the keyword inputs ``names``
    follow the ``n_positional`` positional ones and are passed on by keyword (as HuggingFace models are called).

    The view is a shallow copy of ``model`` whose class is a subclass with that forward (same class name, same
    submodules and parameters, so site names and weights are the model's); ``model`` itself is not touched.
    """
    if not names:
        return model
    model = unwrap(model)[0]
    cls = type(model)
    params = [
        p.name
        for p in inspect.signature(cls.forward).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ][1:]
    positional = [params[i] if i < len(params) and params[i] not in names else f"arg{i}" for i in range(n_positional)]
    call = ", ".join([*positional, *(f"{k}={k}" for k in names)])
    namespace: dict[str, Any] = {"_forward": cls.forward}
    exec(f"def forward(self, {', '.join([*positional, *names])}):\n    return _forward(self, {call})\n", namespace)
    view = copy.copy(model)
    view.__class__ = type(
        cls.__name__,
        (cls,),
        {"forward": namespace["forward"], "__module__": cls.__module__, "__qualname__": cls.__qualname__},
    )
    return view


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
    refuse_observers(model)
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
        raise InputError(
            f"the example inputs are on {', '.join(wrong)} but the model's parameters are on {device}: "
            f"pass inputs on the model's device ({where})"
        )


def on_meta(model: nn.Module | None, inputs: Any) -> bool:
    """Whether a parameter or buffer of ``model``, or a tensor of ``inputs``, is on the meta device (no values)."""
    tensors = [
        *(model.parameters() if model is not None else ()),
        *(model.buffers() if model is not None else ()),
        *(t for t in pytree.tree_leaves(inputs) if isinstance(t, torch.Tensor)),
    ]
    return any(t.device.type == "meta" for t in tensors)


def refuse_meta(model: nn.Module | None, inputs: Any, what: str) -> None:
    """``what`` (a benchmark, an ONNX cross-check, validation) computes real values, which a model or inputs on the
    meta device do not hold: an :class:`InputError` saying what can be done on meta instead."""
    if on_meta(model, inputs):
        raise InputError(
            f"{what} runs the models on real values, and the model or its inputs are on the meta device "
            "(shapes only, no values): on meta, rewrite with validate=False and convert the full "
            "checkpoint with fxsurgery.convert_checkpoint; load real weights (load_state_dict(..., "
            "assign=True), fxsurgery.materialize) for this"
        )


def check_names(kind: str, names: Any, known: Any) -> None:
    """Every name in ``names`` must be one of ``known``; else an :class:`InputError` listing the nearest names."""
    import difflib

    known = sorted(set(known))
    for name in names:
        if isinstance(name, str) and name not in known:
            near = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
            hint = f"; nearest: {', '.join(near)}" if near else ""
            raise InputError(f"{kind} {name!r} matches no module or site of the model{hint}")
