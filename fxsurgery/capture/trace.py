"""``torch.fx`` tracing with user leaf modules, optional arguments fixed to their defaults, and errors that name the
submodule that failed. torch.nn's ``TransformerEncoder``/``TransformerEncoderLayer`` are traced through their
fast-path-free forward, so their Linears are visible."""

from __future__ import annotations

import contextlib
import functools
import inspect
import warnings
from typing import TYPE_CHECKING, Any

import torch.fx as fx
from torch import nn

from fxsurgery import _runtime
from fxsurgery.capture.layers import is_transposed_linear
from fxsurgery.capture.modes import GRAD_MODE, TRAINING, mode_reads
from fxsurgery.errors import InputError, TraceError, one_line

if TYPE_CHECKING:
    from fxsurgery.options import LeafSpec

__all__ = ["trace", "keep_unused", "guard_mode"]

# Functions the rewritten graphs call; re-tracing a rewritten model must keep them as single nodes.
_AUTOWRAP = tuple(
    f for name in _runtime.__all__ if name != "output_builder" and not isinstance(f := getattr(_runtime, name), type)
)


def _encoder_layer_forward(
    layer: nn.TransformerEncoderLayer,
    src: Any,
    src_mask: Any = None,
    src_key_padding_mask: Any = None,
    is_causal: bool = False,
) -> Any:
    """``nn.TransformerEncoderLayer.forward`` without its fast path, whose checks branch on tensor properties and
    cannot be traced; the computation is the same (the fast path is a fused kernel for inference)."""
    x = src
    if layer.norm_first:
        x = x + layer._sa_block(layer.norm1(x), src_mask, src_key_padding_mask, is_causal=is_causal)
        return x + layer._ff_block(layer.norm2(x))
    x = layer.norm1(x + layer._sa_block(x, src_mask, src_key_padding_mask, is_causal=is_causal))
    return layer.norm2(x + layer._ff_block(x))


def _encoder_forward(
    encoder: nn.TransformerEncoder,
    src: Any,
    mask: Any = None,
    src_key_padding_mask: Any = None,
    is_causal: bool | None = None,
) -> Any:
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


class _Tracer(fx.Tracer):
    """A tracer that honours user leaf modules and remembers the innermost submodule that failed."""

    def __init__(self, leaf_modules: LeafSpec) -> None:
        super().__init__(autowrap_functions=_AUTOWRAP)
        self._leaf_types = tuple(x for x in leaf_modules if isinstance(x, type))
        self._leaf_names = {x for x in leaf_modules if isinstance(x, str)}
        self.failed_module: str | None = None
        self.training_reads: list[str] = []  # traced-through modules whose forward branches on self.training
        self.output_type: type | None = None  # the last top-level value converted: the forward's return value
        self._converting = False

    def create_arg(self, a: Any) -> Any:
        """As fx's, remembering the type of a returned dict subclass, which fx turns into a plain dict."""
        if self._converting:
            return super().create_arg(a)
        self._converting = True
        try:
            self.output_type = type(a) if isinstance(a, dict) and type(a) is not dict else None
            return super().create_arg(a)
        finally:
            self._converting = False

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self._leaf_names or (self._leaf_types and isinstance(m, self._leaf_types)):
            return True
        if m._forward_hooks or m._forward_pre_hooks:
            return True  # stays a called module, so that its hooks run and see what they saw before
        if is_transposed_linear(m):
            return True  # a Linear with a transposed weight (GPT-2's Conv1D): a site, as an nn.Linear is
        if type(m) in _TRACEABLE_FORWARDS and not m._forward_hooks and not m._forward_pre_hooks:
            return False
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Any, args: Any, kwargs: Any) -> Any:
        try:
            path = self.path_of_module(m)
            if not self.is_leaf_module(m, path):
                if type(m) in _TRACEABLE_FORWARDS:
                    forward = functools.partial(_TRACEABLE_FORWARDS[type(m)], m)
                else:
                    self._check_modes(m, path)
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_module is None:
                with contextlib.suppress(NameError):
                    self.failed_module = self.path_of_module(m)
            raise

    def _check_modes(self, m: nn.Module, path: str) -> None:
        """Refuse to trace through grad-mode regions (the module is then kept as it is); note training branches."""
        reads = mode_reads(type(m))
        regions = sorted(reads & GRAD_MODE)
        if regions:
            raise _ModeRegion(
                f"{type(m).__name__}.forward uses {', '.join(regions)}, which tracing would drop; its code is kept"
            )
        if TRAINING in reads:
            self.training_reads.append(path or type(m).__name__)


class _ModeRegion(Exception):
    """A forward with grad-mode or autocast regions: it must run as it is."""


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
            f"{type(model).__name__}.forward takes {len(positional)} positional inputs but example_inputs has "
            f"{n_inputs}"
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
    before = _state_versions(model)
    try:
        if not isinstance(model, fx.GraphModule):
            tracer._check_modes(model, "")
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
    _refuse_trace_time_writes(model, before)
    if tracer.training_reads:
        guard_mode(graph, model.training, tracer.training_reads)
    if tracer.output_type is not None:
        _rebuild_output(graph, tracer.output_type)
    gm = fx.GraphModule(tracer.root, graph, model.__class__.__name__)
    keep_unused(gm, tracer.root)
    return gm


def _state_versions(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Identity and version counter of every buffer and parameter: what an in-place write or a reassignment moves."""
    return {name: (id(t), t._version) for name, t in [*model.named_buffers(), *model.named_parameters()]}


def _refuse_trace_time_writes(model: nn.Module, before: dict[str, tuple[int, int]]) -> None:
    """``symbolic_trace`` runs the forward once with proxies for the inputs: a write to a buffer that does not involve
    an input (``self.steps += 1``, ``self.running.mul_(0.9)``) runs then, on the traced copy, and is recorded
    nowhere, so the graph would never update that state. Refuse, naming the buffer and its owner (the caller keeps
    that module's code as it is)."""
    after = _state_versions(model)
    changed = [name for name in {**before, **after} if before.get(name) != after.get(name)]
    if not changed:
        return
    name = changed[0]
    owner = name.rpartition(".")[0]
    where = f"{owner} ({type(model.get_submodule(owner)).__name__})" if owner else type(model).__name__
    cause = (
        f"it writes to {name!r} where torch.fx cannot record it (fx runs that write once, while tracing, so a "
        "traced graph would never update it)"
    )
    raise TraceError(
        f"the forward of {where}: {cause}; its code is kept as it is, or use frontend='export', which "
        "records state updates",
        module=owner,
        cause=cause,
    )


def _rebuild_output(graph: fx.Graph, cls: type) -> None:
    """The forward returned a dict subclass (a ``ModelOutput``): return one again, not the plain dict fx records."""
    out = next(n for n in graph.nodes if n.op == "output")
    with graph.inserting_before(out):
        built = graph.call_function(_runtime.output_builder(cls), (out.args[0],))
    out.args = (built,)


def keep_unused(gm: fx.GraphModule, root: nn.Module) -> None:
    """Modules, parameters and buffers the traced forward does not use (an auxiliary head used only in training, a
    buffer only the loss reads) stay in the GraphModule under their names, so that its state dict has every key."""
    have = {n for n, _ in gm.named_modules()}
    for name, mod in root.named_modules():  # parents before children
        if name not in have:
            gm.add_submodule(name, mod)
            have |= {f"{name}.{n}" if n else name for n, _ in mod.named_modules()}
    state = gm.state_dict(keep_vars=True)
    for name, tensor in [*root.named_parameters(), *root.named_buffers()]:
        if name in state:
            continue
        owner_name, _, attr = name.rpartition(".")
        owner, source = gm.get_submodule(owner_name), root.get_submodule(owner_name)
        if isinstance(tensor, nn.Parameter):
            owner.register_parameter(attr, tensor)
        else:
            owner.register_buffer(attr, tensor, persistent=attr not in source._non_persistent_buffers_set)


def guard_mode(graph: fx.Graph, training: bool, where: list[str]) -> None:
    """The graph holds the branches of the traced mode: check, first thing, that it runs in that mode."""
    first = next(n for n in graph.nodes if n.op != "placeholder")
    with graph.inserting_before(first), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # fx warns that ``training`` is no parameter or buffer
        flag = graph.get_attr("training")
        graph.call_function(_runtime.check_mode, (flag, training, tuple(dict.fromkeys(where))))
