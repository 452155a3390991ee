"""The ``torch.export`` front end: capture a model with ``torch.export`` (which reaches code ``symbolic_trace``
cannot: HuggingFace forwards with ``**kwargs`` decorators, branches on shapes), then raise the ATen graph back to the
torch level the rules read.

Raising has two parts. An ATen layer op whose weights are exactly those of a layer the model owns, called inside
that layer (``nn_module_stack``), becomes a call of that module again (``aten.linear(x, fc.weight, fc.bias)`` ->
``self.fc(x)``): site names are module paths, weights stay the model's own, and every rule, skip reason and
layout of the fx path applies unchanged. Other ATen ops with a torch-level twin of the same signature become that
twin (``aten.view`` -> ``x.view``, ``aten.relu`` -> ``torch.relu``); the rest stay ATen calls, which the rules
treat as opaque (a layout is left before them).
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import inspect
import io
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, cast

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from fxsurgery.capture.guards import guard_sizes
from fxsurgery.capture.heap import settled_heap
from fxsurgery.capture.inputs import is_tokens
from fxsurgery.capture.layers import is_transposed_linear
from fxsurgery.capture.modes import TRAINING, mode_reads
from fxsurgery.capture.trace import guard_mode, keep_unused
from fxsurgery.capture.unlift import unlift
from fxsurgery.errors import InputError, TraceError, one_line, quiet_loggers

__all__ = ["export_model", "raise_program", "inert_hook"]

aten = torch.ops.aten

# ATen ops whose torch-level twin takes the same arguments.
_FUNCTIONS: dict[Any, Callable[..., Any]] = {
    aten.relu.default: torch.relu,
    aten.gelu.default: F.gelu,
    aten.silu.default: F.silu,
    aten.hardswish.default: F.hardswish,
    aten.hardsigmoid.default: F.hardsigmoid,
    aten.sigmoid.default: torch.sigmoid,
    aten.tanh.default: torch.tanh,
    aten.hardtanh.default: F.hardtanh,
    aten.dropout.default: torch.dropout,
    aten.exp.default: torch.exp,
    aten.sqrt.default: torch.sqrt,
    aten.rsqrt.default: torch.rsqrt,
    aten.neg.default: torch.neg,
    aten.abs.default: torch.abs,
    aten.erf.default: torch.erf,
    aten.add.Tensor: torch.add,
    aten.sub.Tensor: torch.sub,
    aten.mul.Tensor: torch.mul,
    aten.div.Tensor: torch.div,
    aten.flatten.using_ints: torch.flatten,
    aten.mean.dim: torch.mean,
    aten.permute.default: torch.permute,
    aten.adaptive_avg_pool2d.default: F.adaptive_avg_pool2d,
    aten.linear.default: F.linear,
    aten.softmax.int: torch.softmax,
    aten.matmul.default: torch.matmul,
    aten.scaled_dot_product_attention.default: F.scaled_dot_product_attention,
    # in place (``nn.ReLU(inplace=True)``, ``nn.Dropout(inplace=True)``, ``ReLU6``, ``x += y``): the engine's in-place
    # checks apply to them as to their fx twins
    aten.relu_.default: torch.relu_,
    aten.dropout_.default: torch.dropout_,
    aten.silu_.default: torch._C._nn.silu_,
    aten.hardswish_.default: torch._C._nn.hardswish_,
    aten.hardtanh_.default: F.hardtanh_,
}
_METHODS: dict[Any, str] = {
    aten.view.default: "view",
    aten.reshape.default: "reshape",
    aten.transpose.int: "transpose",
    aten.t.default: "t",
    aten.unsqueeze.default: "unsqueeze",
    aten.squeeze.dim: "squeeze",
    aten.expand.default: "expand",
    aten.contiguous.default: "contiguous",
    aten.add_.Tensor: "add_",
    aten.mul_.Tensor: "mul_",
}


#: Checks the export adds of the traced dtypes and layouts, which a float64 proof would trip.
_ASSERTIONS = {aten._assert_tensor_metadata.default}


def _batch_of_one(args: tuple[Any, ...]) -> bool:
    tensors = [t for t in args if isinstance(t, torch.Tensor) and t.dim()]
    return bool(tensors) and all(t.shape[0] == 1 for t in tensors)


def _twice(args: tuple[Any, ...]) -> tuple[Any, ...]:
    """Each tensor input repeated along its batch: ``torch.export`` specialises a dim of size 1, so a batch of one
    is exported as a batch of two to keep it dynamic."""
    return tuple(torch.cat([a, a]) if isinstance(a, torch.Tensor) and a.dim() else a for a in args)


@settled_heap()
def export_model(model: nn.Module, args: tuple[Any, ...], dynamic_shapes: Any = None) -> torch.export.ExportedProgram:
    """``torch.export.export(model, args, strict=False)`` with the dims :func:`dynamic_axes` says dynamic (by default
    dim 0 of every tensor input, ``Dim.AUTO``: kept static where the model fixes it), or ``dynamic_shapes``. A model
    that cannot run at another batch than the given one of 1 (it holds state of that batch: a static KV cache) is
    exported at that batch. Keyword inputs reach it as positional ones (:mod:`fxsurgery.capture.inputs`)."""
    _register_hf_caches(model)
    if dynamic_shapes is not None:
        return _export(model, args, dynamic_shapes)
    if not _AXES.get()[0] or not _batch_of_one(args):  # (a static batch asked: the example's)
        return _export(model, args, _dynamic_dims(args))
    try:
        return _export(model, _twice(args), _dynamic_dims(args))
    except TraceError:
        return _export(model, args, None)


#: ``Options.dynamic_batch`` and ``Options.dynamic_sequence`` while a rewrite runs (:func:`dynamic_axes`).
_AXES: contextvars.ContextVar[tuple[bool, bool]] = contextvars.ContextVar("fxsurgery_axes", default=(True, False))


@contextlib.contextmanager
def dynamic_axes(batch: bool, sequence: bool) -> Iterator[None]:
    """While the block runs, torch.export traces dim 0 of tensor inputs (the batch, if ``batch``: else the example's
    is fixed) and dim 1 of token inputs (ids, masks: the sequence, if ``sequence``) as dynamic."""
    token = _AXES.set((batch, sequence))
    try:
        yield
    finally:
        _AXES.reset(token)


def _dynamic_dims(args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    """Dim 0 of every tensor input dynamic and dim 1 of token inputs, each ``Dim.AUTO`` (kept static where the model
    fixes it), as :func:`dynamic_axes` says."""
    auto, (batch, sequence) = torch.export.Dim.AUTO, _AXES.get()
    shapes = tuple(
        ({0: auto} if batch else {}) | ({1: auto} if sequence and is_tokens(a) else {})
        if isinstance(a, torch.Tensor) and a.dim()
        else None
        for a in args
    )
    return shapes if any(shapes) else None


def _by_signature(model: nn.Module, args: tuple[Any, ...], dynamic_shapes: Any) -> Any:
    """``dynamic_shapes`` (one entry per input) laid out as ``model.forward``'s parameters, as torch.export reads
    them: the entries of inputs that a ``*args`` parameter takes, one tuple (else torch.export counts one input)."""
    try:
        signature = inspect.signature(model.forward)
        bound = signature.bind(*args).arguments
    except (TypeError, ValueError):
        return dynamic_shapes
    if not isinstance(dynamic_shapes, tuple) or not any(
        signature.parameters[name].kind is inspect.Parameter.VAR_POSITIONAL for name in bound
    ):
        return dynamic_shapes
    out, i = {}, 0
    for name, value in bound.items():
        if signature.parameters[name].kind is inspect.Parameter.VAR_POSITIONAL:
            out[name], i = tuple(dynamic_shapes[i : i + len(value)]), i + len(value)
        else:
            out[name], i = dynamic_shapes[i], i + 1
    return out


def _export(model: nn.Module, args: tuple[Any, ...], dynamic_shapes: Any) -> torch.export.ExportedProgram:
    try:
        with _quiet_torch():
            shapes = _by_signature(model, args, dynamic_shapes)
            return torch.export.export(model, args, dynamic_shapes=shapes, strict=False)
    except Exception as e:
        raise TraceError(f"torch.export cannot capture {type(model).__name__}: {one_line(e)}", cause=one_line(e)) from e


@contextlib.contextmanager
def _quiet_torch() -> Iterator[None]:
    """torch's own loggers below ERROR while exporting: a failed export (which ``frontend="auto"`` answers by keeping
    fx) must not print graph dumps and warnings; the error is reported once, by fxsurgery."""
    with quiet_loggers("torch"), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield  # the graph a failed export prints


def _register_hf_caches(model: nn.Module) -> None:
    """HuggingFace models return cache objects (a decoder's ``DynamicCache``, an encoder-decoder's
    ``EncoderDecoderCache``, Mamba's ``DynamicCache`` of linear-attention layers), which ``torch.export`` can output
    only once transformers has registered them as pytree nodes (process-wide; a class's first registration stays):
    its exporter's ``register_cache_pytrees_for_model`` registers every ``Cache`` subclass (and the cache classes of
    the model's modeling module; with no transformers module, ``DynamicCache``) with a flatten of any layer type,
    whichever model comes first; before that package, ``register_dynamic_cache_export_support`` (attention only)."""
    if "transformers" not in sys.modules:
        return
    try:
        from transformers.cache_utils import DynamicCache
        from transformers.exporters.exporter_dynamo import register_cache_pytrees_for_model, register_pytree_node
    except ImportError:
        from transformers.integrations.executorch import register_dynamic_cache_export_support

        register_dynamic_cache_export_support()
        return
    hf = next((m for m in model.modules() if type(m).__module__.startswith("transformers.")), None)
    if hf is None:  # (the classes of a user's own module are left alone)
        register_pytree_node(DynamicCache)
    else:  # a user's wrapper reaches it too
        register_cache_pytrees_for_model(cast(Any, hf))


def inert_hook(hook: Any) -> bool:
    """HuggingFace's output-capturing hooks (installed on the first call; they record hidden states only while
    ``output_hidden_states``/``output_attentions`` is asked): nothing for an export to run twice or lose."""
    return getattr(hook, "__module__", "") == "transformers.utils.output_capturing"


def _owner(node: Any, modules: Mapping[str, nn.Module]) -> tuple[str, str] | None:
    """``(module path, attribute)`` of a ``get_attr`` node reading a module's parameter or buffer."""
    if not (isinstance(node, fx.Node) and node.op == "get_attr"):
        return None
    path, _, attr = str(node.target).rpartition(".")
    return (path, attr) if path in modules else None


def _called_in(node: fx.Node, path: str) -> bool:
    """Whether ``node`` was recorded inside the forward of the module at ``path`` (its innermost module)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return False
    inner = list(stack.values())[-1][0]
    return str(inner).removeprefix("L['self'].").replace("L['self']", "") == path or inner == path


def _layer_of(node: fx.Node, modules: Mapping[str, nn.Module]) -> tuple[str, nn.Module] | None:
    """The module a layer op computes, when its weights are exactly that module's and it ran inside it."""
    target, args = node.target, tuple(node.args)
    weight = _owner(args[1] if len(args) > 1 else None, modules)
    if target is aten.layer_norm.default:
        weight = _owner(args[2] if len(args) > 2 else None, modules)
    if weight is None or weight[1] != "weight" or not _called_in(node, weight[0]):
        return None
    path, mod = weight[0], modules[weight[0]]
    if target is aten.linear.default and isinstance(mod, nn.Linear) and len(args) <= 3 and not node.kwargs:
        bias = args[2] if len(args) > 2 else None
        return (path, mod) if _same_param(bias, mod, "bias", modules) else None
    if target in (aten.conv2d.default, aten.conv1d.default) and isinstance(mod, (nn.Conv2d, nn.Conv1d)):
        return (path, mod) if _conv_matches(node, mod, modules) else None
    if target is aten.layer_norm.default and isinstance(mod, nn.LayerNorm) and not node.kwargs:
        shape, eps = list(cast(Sequence[int], args[1])), args[4] if len(args) > 4 else 1e-5
        same = shape == list(mod.normalized_shape) and eps == mod.eps
        return (path, mod) if same and _same_param(args[3] if len(args) > 3 else None, mod, "bias", modules) else None
    return None


def _same_param(node: Any, mod: nn.Module, attr: str, modules: Mapping[str, nn.Module]) -> bool:
    if getattr(mod, attr, None) is None:
        return node is None
    owner = _owner(node, modules)
    return owner is not None and modules[owner[0]] is mod and owner[1] == attr


def _conv_matches(node: fx.Node, mod: Any, modules: Mapping[str, nn.Module]) -> bool:
    """``aten.conv{1,2}d(x, w, b, stride, padding, dilation, groups)`` with the module's own settings."""
    args: list[Any] = [*node.args, *[None] * (7 - len(node.args))]
    k = len(mod.kernel_size)
    defaults = ((1,) * k, (0,) * k, (1,) * k, 1)
    given = [tuple(a) if isinstance(a, (list, tuple)) else a for a in args[3:]]
    got = [d if g is None else g for g, d in zip(given, defaults)]
    padding = mod.padding if isinstance(mod.padding, str) else tuple(mod.padding)
    want = [tuple(mod.stride), padding, tuple(mod.dilation), mod.groups]
    return (
        got == want and mod.padding_mode == "zeros" and _same_param(args[2], mod, "bias", modules) and not node.kwargs
    )


@settled_heap()
def raise_program(ep: torch.export.ExportedProgram, root: nn.Module, batch_one: bool = True) -> fx.GraphModule:
    """The exported graph at the torch level, as a GraphModule over ``root`` (a copy of the exported model: layers
    the graph calls again are its own modules), checking its inputs against the program's static sizes and ranges
    (``batch_one``: whether a range from 2, torch.export's own 0/1 specialisation, admits 0 and 1)."""
    graph, lifted = unlift(ep)
    modules = dict(root.named_modules())
    for node in list(graph.nodes):  # first the patterns of several ATen ops, while they are ATen ops
        conv1d = _conv1d_call(node, modules) if node.op == "call_function" else None
        if conv1d is not None:
            path, x, out = conv1d
            with graph.inserting_before(out):
                call = graph.call_module(path, (x,))
            call.meta = dict(out.meta)
            out.replace_all_uses_with(call)  # the addmm and its views are left without users, removed below
    for node in list(graph.nodes):
        if node.op == "call_module" and str(node.target).startswith("_guards") or node.target in _ASSERTIONS:
            graph.erase_node(node)  # the export's input guards and dtype assertions (validation runs in float64)
        elif node.op == "call_function":
            _raise_node(graph, node, modules, root)
    # what a raised layer no longer needs (a Conv1D's addmm)
    graph.eliminate_dead_code(is_impure_node=lambda node: _kept(node, root))
    guard_sizes(graph, ep.range_constraints, batch_one)
    for node in graph.nodes:  # constants the export lifted out of the code (``lifted_tensor_0``): kept
        target = str(node.target)
        if node.op == "get_attr" and not _has_attr(root, target):
            owner, _, attr = target.rpartition(".")
            if not _has_attr(root, owner) and owner:
                raise InputError(f"the exported program reads {target}, which the model does not have")
            value, holder = lifted(target), root.get_submodule(owner)
            if isinstance(value, torch.Tensor):  # a buffer, so .double() / .to() convert it as they do the model
                holder.register_buffer(attr, _dense(value), persistent=False)
            else:
                setattr(holder, attr, value)
    modal = [name or type(root).__name__ for name, m in root.named_modules() if TRAINING in mode_reads(type(m))]
    if modal:  # dropout, batch norm ...: the export fixed their mode's branch
        guard_mode(graph, root.training, modal[:3] + ([f"{len(modal) - 3} more"] if len(modal) > 3 else []))
    raised = fx.GraphModule(root, graph, class_name=type(root).__name__)
    keep_unused(raised, root)  # every key of the state dict, and the names a tied weight has (lm_head, wte)
    raised.meta["frontend"] = "export"
    return raised


def _dense(t: torch.Tensor) -> torch.Tensor:
    """A lifted constant with strides of no memory format (an expanded mask) as a contiguous copy: ExecuTorch makes
    such constants contiguous, and on a non-persistent buffer its pass fails ("Missing input spec for lifted
    tensor"), where the original's constant lowers."""
    dense = t.is_contiguous() or t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last)
    return t if dense else t.contiguous()


def _kept(node: fx.Node, root: nn.Module) -> bool:
    """Nodes dead-code removal must keep though nothing reads them: fx's impure ones (a module call, where the
    module of ``root`` says so), and every in-place op (a buffer update such as ``running.mul_(0.9).add_(...)`` or
    BatchNorm's ``num_batches_tracked.add_(1)``, raised to ``call_method`` ``mul_``/``add_``, which fx would drop)."""
    if node.op == "call_module":
        return bool(getattr(root.get_submodule(str(node.target)), "_is_impure", False))
    if node.is_impure():
        return True
    target = node.target
    name = target if isinstance(target, str) else getattr(target, "__name__", "")
    return node.op in ("call_method", "call_function") and name.split(".")[0].endswith("_")


def _has_attr(root: nn.Module, target: str) -> bool:
    obj: Any = root
    for part in target.split("."):
        if not hasattr(obj, part):
            return False
        obj = getattr(obj, part)
    return True


#: The layers an ATen op is raised back to; a subclass (HF ConvNeXt's LayerNorm, a QAT Linear) whose forward the
#: export inlined becomes its base class at the call: the op recorded there is exactly the base class's.
_BASES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d, nn.Conv1d, nn.LayerNorm)


def _as_base(root: nn.Module, path: str, mod: nn.Module) -> None:
    base = next(b for b in _BASES if isinstance(mod, b))
    if type(mod) is base:
        return
    plain = copy.copy(mod)  # same parameters, buffers and attributes; nothing else calls it in the raised graph
    plain.__class__ = base
    root.set_submodule(path, plain)


_VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)


def _conv1d_call(node: fx.Node, modules: Mapping[str, nn.Module]) -> tuple[str, fx.Node, fx.Node] | None:
    """``(path, x, out)`` when ``node`` is the ``addmm`` of a transformers Conv1D at ``path`` (``x.view(-1, nx)``
    -> ``addmm(b, ., W)`` -> ``out = .view(..., nf)``, recorded inside it)."""
    weight = _owner(node.args[2] if len(node.args) > 2 else None, modules)
    if node.target is not aten.addmm.default or node.kwargs or weight is None or weight[1] != "weight":
        return None
    path, mod = weight[0], modules[weight[0]]
    flat, users = node.args[1], list(node.users)
    if not (is_transposed_linear(mod) and _called_in(node, path) and _same_param(node.args[0], mod, "bias", modules)):
        return None
    if not (isinstance(flat, fx.Node) and flat.target in _VIEWS and len(users) == 1 and users[0].target in _VIEWS):
        return None
    x = flat.args[0]
    return (path, x, users[0]) if isinstance(x, fx.Node) else None


def _raise_node(graph: fx.Graph, node: fx.Node, modules: dict[str, nn.Module], root: nn.Module) -> None:
    layer = _layer_of(node, modules)
    if layer is not None:
        _as_base(root, *layer)
        modules[layer[0]] = root.get_submodule(layer[0])
        with graph.inserting_before(node):
            call = graph.call_module(layer[0], (node.args[0],))
        call.meta = dict(node.meta)
        node.replace_all_uses_with(call)
        graph.erase_node(node)
    elif node.target in _FUNCTIONS:
        node.target = _FUNCTIONS[node.target]
    elif node.target in _METHODS:
        node.op, node.target = "call_method", _METHODS[node.target]
