"""Tracing, copying and shape propagation: everything the rules need before they look at a graph.

* :func:`prepare_model` unwraps ``DataParallel``/``DistributedDataParallel`` and rejects models fx cannot represent
  faithfully (ScriptModules, hooks on the root, uninitialised lazy modules) with a specific message.
* :func:`trace` runs ``torch.fx.symbolic_trace`` with user leaf modules and names the submodule that failed.
* :func:`working_copy` copies a module's structure while its parameters stay views of the original storage (zero
  copy) and its buffers are cloned, so nothing done to the copy (train/eval, BatchNorm statistics) reaches the original.
* :func:`propagate_shapes` records ``node.meta["val"]`` with fake tensors: no real activations are computed.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from fxsurgery import _runtime
from fxsurgery.errors import InputError, TraceError, one_line

__all__ = [
    "LeafSpec",
    "normalize_inputs",
    "prepare_model",
    "trace",
    "working_copy",
    "propagate_shapes",
    "shape_of",
]

log = logging.getLogger(__name__)

LeafSpec = Sequence["type[nn.Module] | str"]

# Functions the rewritten graphs call; re-tracing a rewritten model must keep them as single nodes.
_AUTOWRAP = (_runtime.check_spatial_size, _runtime.layer_norm_channels, _runtime.window_attention_nchw)


def _encoder_layer_forward(layer: nn.TransformerEncoderLayer, src: Any, src_mask: Any = None,
                           src_key_padding_mask: Any = None, is_causal: bool = False) -> Any:  # fmt: skip
    """``nn.TransformerEncoderLayer.forward`` without its fast path, whose checks branch on tensor properties and
    cannot be traced; the computation is the same (the fast path is a fused kernel for inference)."""
    x = src
    if layer.norm_first:
        x = x + layer._sa_block(layer.norm1(x), src_mask, src_key_padding_mask, is_causal=is_causal)
        return x + layer._ff_block(layer.norm2(x))
    x = layer.norm1(x + layer._sa_block(x, src_mask, src_key_padding_mask, is_causal=is_causal))
    return layer.norm2(x + layer._ff_block(x))


def _encoder_forward(encoder: nn.TransformerEncoder, src: Any, mask: Any = None, src_key_padding_mask: Any = None,
                     is_causal: bool | None = None) -> Any:  # fmt: skip
    """``nn.TransformerEncoder.forward`` without masks and without its nested-tensor fast path."""
    if mask is not None or src_key_padding_mask is not None:
        return encoder.forward(src, mask, src_key_padding_mask, is_causal)  # not traceable: fails like before
    out = src
    for layer in encoder.layers:
        out = layer(out)
    return encoder.norm(out) if encoder.norm is not None else out


#: torch.nn modules fx treats as leaves whose Linears we need: traced through a fast-path-free forward instead.
_TRACEABLE_FORWARDS: dict[type, Any] = {
    nn.TransformerEncoderLayer: _encoder_layer_forward,
    nn.TransformerEncoder: _encoder_forward,
}


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
        if isinstance(m, nn.modules.lazy.LazyModuleMixin) and m.has_uninitialized_params()
    ]
    if lazy:
        raise InputError(
            f"model has uninitialised lazy modules ({', '.join(lazy[:3])}); run one forward pass on a real input "
            "first so their shapes are known"
        )
    return model


class _Tracer(fx.Tracer):
    """A tracer that honours user leaf modules and remembers the innermost submodule that failed."""

    def __init__(self, leaf_modules: LeafSpec) -> None:
        super().__init__(autowrap_functions=_AUTOWRAP)
        self._leaf_types = tuple(x for x in leaf_modules if isinstance(x, type))
        self._leaf_names = {x for x in leaf_modules if isinstance(x, str)}
        self.failed_module: str | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self._leaf_names or (self._leaf_types and isinstance(m, self._leaf_types)):
            return True
        if type(m) in _TRACEABLE_FORWARDS and not m._forward_hooks and not m._forward_pre_hooks:
            return False
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Any, args: Any, kwargs: Any) -> Any:
        if type(m) in _TRACEABLE_FORWARDS and not self.is_leaf_module(m, self.path_of_module(m)):
            forward = functools.partial(_TRACEABLE_FORWARDS[type(m)], m)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_module is None:
                with contextlib.suppress(NameError):
                    self.failed_module = self.path_of_module(m)
            raise


_CONCRETE = (type(None), bool, int, float, str)


def _concrete_args(model: nn.Module, n_inputs: int | None) -> dict[str, Any]:
    """Optional ``forward`` arguments the example inputs do not supply, fixed to their defaults.

    Without this, fx would trace ``if scale is not None:`` on a Proxy as true and bake in a branch the original does
    not take. fx guards the specialisation: the traced model raises if called with another value.
    """
    if n_inputs is None:
        return {}
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return {}
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if any(p.kind == p.VAR_POSITIONAL for p in params):
        return {}
    required = [p.name for p in positional if p.default is p.empty]
    if n_inputs < len(required):
        raise InputError(
            f"{type(model).__name__}.forward({', '.join(required)}) needs {len(required)} inputs but example_inputs "
            f"has {n_inputs}"
        )
    if n_inputs > len(positional):
        raise InputError(
            f"{type(model).__name__}.forward takes {len(positional)} positional inputs but example_inputs has {n_inputs}"
        )
    rest = positional[n_inputs:] + [p for p in params if p.kind == p.KEYWORD_ONLY]
    return {p.name: p.default for p in rest if p.default is not p.empty and isinstance(p.default, _CONCRETE)}


def trace(model: nn.Module, leaf_modules: LeafSpec = (), n_inputs: int | None = None) -> fx.GraphModule:
    """Symbolically trace ``model``; a GraphModule is returned as it is (its graph is already explicit).

    ``n_inputs``, the number of example inputs, lets optional arguments past them be fixed to their defaults.
    """
    for leaf in leaf_modules:
        if not isinstance(leaf, (str, type)):
            raise InputError(f"leaf_modules entries must be module types or qualified names, got {leaf!r}")
    if isinstance(model, fx.GraphModule) and not leaf_modules:
        return model
    tracer = _Tracer(leaf_modules)
    concrete = _concrete_args(model, n_inputs)
    try:
        graph = tracer.trace(model, concrete_args=concrete or None)
    except Exception as e:  # torch.fx raises many types (TraceError, TypeError, NameError, RuntimeError, ...)
        where = tracer.failed_module
        if where:
            sub = model.get_submodule(where)
            hint = f"leaf_modules=({where!r},) or leaf_modules=({type(sub).__name__},)"
            cause = f"cannot trace submodule {where!r} ({type(sub).__name__}): {one_line(e)}"
            msg = f"{cause}; mark it as a leaf: {hint}"
        else:
            cause = f"cannot trace {type(model).__name__}.forward: {one_line(e)}"
            msg = f"{cause}; move the untraceable code into a submodule and pass it in leaf_modules"
        raise TraceError(msg, module=where or "", cause=cause) from e
    name = model.__class__.__name__
    return fx.GraphModule(tracer.root, graph, name)


def working_copy(module: nn.Module) -> Any:
    """Copy ``module``'s structure; parameters alias the original storage.

    New module objects (so ``train()``/``eval()``, hooks and attribute changes stay local), new ``Parameter`` objects
    viewing the same data (so no memory is copied and ``requires_grad`` is kept), cloned buffers (so BatchNorm
    statistics never move in the original).
    """
    memo: dict[int, Any] = {id(p): nn.Parameter(p.detach(), requires_grad=p.requires_grad) for p in module.parameters()}
    for m in module.modules():  # computed tensors kept as attributes (old-style weight_norm) cannot be deep-copied
        for v in vars(m).values():
            if isinstance(v, torch.Tensor) and not v.is_leaf:
                memo[id(v)] = v.detach()
    try:
        return copy.deepcopy(module, memo)
    except Exception as e:
        raise InputError(f"cannot copy the model ({one_line(e)}); fxsurgery never modifies the model in place") from e


@contextlib.contextmanager
def _frozen_buffers(module: nn.Module) -> Iterator[None]:
    """Restore every buffer and tensor attribute after the block: shape propagation runs train-mode code that updates
    statistics, and hooks that assign tensors."""
    saved = [(b, b.detach().clone()) for b in module.buffers() if b.device.type != "meta"]
    # Tensors held as plain attributes (old-style weight_norm recomputes ``weight`` in a pre-hook) would be left as
    # fake tensors: put the real ones back.
    attrs = [(m, k, v) for m in module.modules() for k, v in vars(m).items() if isinstance(v, torch.Tensor)]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, v in saved:
                if b.shape == v.shape:
                    b.copy_(v)
        for m, k, v in attrs:
            setattr(m, k, v)


def propagate_shapes(gm: fx.GraphModule, inputs: tuple[torch.Tensor, ...]) -> None:
    """Record ``node.meta["val"]`` (a fake tensor, or a Python value) for every node of ``gm``.

    Fake tensors carry shape, dtype and device without data, so this costs no FLOPs. Leaf modules that cannot run on
    fake tensors fall back to one real run on clones of the inputs.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    with _frozen_buffers(gm), torch.no_grad():
        try:
            FakeTensorProp(gm, FakeTensorMode(allow_non_fake_inputs=True)).propagate(*inputs)
            return
        except Exception as fake_error:  # fall back to real values below
            log.info("fake shape propagation failed (%s); running the example inputs for real", fake_error)
        try:
            _RealProp(gm).run(*[t.clone() for t in inputs])
        except Exception as e:
            raise TraceError(
                f"the traced model fails on the example inputs: {one_line(e)}; check the input shapes and dtypes"
            ) from e


class _RealProp(fx.Interpreter):
    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        if isinstance(result, torch.Tensor):
            n.meta["val"] = torch.empty_like(result, device="meta")
        elif isinstance(result, (int, float, bool, torch.Size, tuple, list)):
            n.meta["val"] = result
        return result


def shape_of(node: Any) -> tuple[int, ...] | None:
    """The static shape recorded for ``node``, or None when it is not a tensor node."""
    if not isinstance(node, fx.Node):
        return None
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        try:
            return tuple(int(d) for d in val.shape)
        except TypeError:  # symbolic sizes
            return None
    return None
