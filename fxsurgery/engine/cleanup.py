"""The steps that end a pass, each on its own: cancel permutes that undo a carried layout, drop unused reads of
carried values, convert back where a consumer outside a region needs the original layout, remove the original
nodes now computed elsewhere, and install the new modules.

Dead-code removal is not ``graph.eliminate_dead_code()``: that also drops in-place ops such as ``x.mul_(2)`` whose
result is unused.
"""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING

import torch
import torch.fx as fx
from torch import nn

from fxsurgery.engine.elementwise import elementwise_tensor_inputs
from fxsurgery.engine.layout import permute_dims
from fxsurgery.engine.nodes import hook_kinds

if TYPE_CHECKING:
    from fxsurgery.engine.rewriter import Rewriter

__all__ = [
    "finish",
    "cancel_permutes",
    "drop_unused_reads",
    "convert_back",
    "remove_dead",
    "install_modules",
    "erasable",
]

_INPLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.setitem}


def finish(rw: Rewriter) -> None:
    """Every step, in order; the graph is linted and the module recompiled."""
    drop_unused_reads(rw)
    cancel_permutes(rw)
    convert_back(rw)
    remove_dead(rw.graph, rw.modules, _erased_originals(rw) + _unused_added(rw))
    install_modules(rw.gm, rw.new_modules, rw.modules)
    rw.graph.lint()
    rw.gm.recompile()


def _outside_users(rw: Rewriter, node: fx.Node) -> list[fx.Node]:
    return [u for u in node.users if u not in rw.alt]


def drop_unused_reads(rw: Rewriter) -> None:
    """Unused readers of a carried value (ViT's ``x.shape``, read only for an assert message) are removed, so the
    value need not be converted back for them."""
    for node in list(rw.alt):
        for u in _outside_users(rw, node):
            if not u.users and erasable(u, rw.modules):
                rw.graph.erase_node(u)


def cancel_permutes(rw: Rewriter) -> None:
    """A user that permutes a carried value back to the layout it is carried in is the carried value itself."""
    for node in list(rw.alt):
        alt, layout = rw.alt[node]
        if layout.to_alt is None:
            continue
        for u in _outside_users(rw, node):
            if permute_dims(u) == layout.to_alt:
                u.replace_all_uses_with(alt)
                rw.graph.erase_node(u)


def convert_back(rw: Rewriter) -> None:
    """Consumers outside the layout read one conversion back (built once per value)."""
    for node in list(rw.alt):
        outside = _outside_users(rw, node)
        if outside:
            back = rw.exit_of(node)
            for u in outside:
                if u is not back:
                    u.replace_input_with(node, back)
                    _view_as_reshape(u, back)


def _view_as_reshape(user: fx.Node, back: fx.Node) -> None:
    """``back.view(shape)`` becomes ``back.reshape(shape)``: the original value was contiguous, the conversion back
    may not be (a transpose), and ``view`` refuses strides it cannot merge; ``reshape`` gives the same values."""
    sizes = not any(isinstance(a, torch.dtype) for a in user.args[1:])  # view(dtype) reinterprets: kept
    if user.op == "call_method" and user.target == "view" and user.args[:1] == (back,) and sizes:
        user.target = "reshape"


def _erased_originals(rw: Rewriter) -> list[fx.Node]:
    """Original nodes now computed in another layout are removed (last first); returns what fed them."""
    work: list[fx.Node] = []
    for node in reversed(list(rw.alt)):
        if not node.users and not node._erased:
            work.extend(node.all_input_nodes)
            rw.graph.erase_node(node)
    return work


def _unused_added(rw: Rewriter) -> list[fx.Node]:
    """Nodes a rule added and nothing reads (a run-time size check of a site that was then skipped)."""
    return [n for n in rw.graph.nodes if n not in rw.original_nodes and not n.users]


def remove_dead(graph: fx.Graph, modules: dict[str, nn.Module], work: list[fx.Node]) -> None:
    """Remove the unused, erasable nodes of ``work`` and then whatever fed only them."""
    while work:
        node = work.pop()
        if getattr(node, "_erased", False) or node.users or not erasable(node, modules):
            continue
        inputs = list(node.all_input_nodes)
        graph.erase_node(node)
        work.extend(inputs)


def erasable(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether an unused node may be removed: no in-place op, no module with side effects, no graph input."""
    if node.op in ("placeholder", "output") or node.is_impure():
        return False
    target = node.target
    name = target if isinstance(target, str) else getattr(target, "__name__", "")
    if node.op != "get_attr" and (name.endswith("_") or target in _INPLACE_OPERATORS):  # relu_, mul_, +=, ...
        return False
    if node.op == "call_module":
        mod = modules.get(str(target))
        if mod is None or hook_kinds(mod):
            return False  # its hooks must run
        return elementwise_tensor_inputs(node, modules) is not None or isinstance(mod, nn.Flatten)
    return True


def install_modules(gm: fx.GraphModule, new_modules: dict[str, nn.Module], old: dict[str, nn.Module]) -> None:
    """Put each new module in place of the old one of the same name; buffers and parameters the old one holds and the
    new one lacks (``fc.act_scale``) move over, so the state dict keeps every key."""
    for name, mod in new_modules.items():
        before = old.get(name)
        if before is not None:
            keep = set(dict(mod.named_parameters(recurse=False))) | set(dict(mod.named_buffers(recurse=False)))
            for pname, p in before.named_parameters(recurse=False):
                if pname not in keep:
                    mod.register_parameter(pname, p)
            for bname, b in before.named_buffers(recurse=False):
                if bname not in keep:
                    mod.register_buffer(bname, b, persistent=bname not in before._non_persistent_buffers_set)
        gm.add_submodule(name, mod)
