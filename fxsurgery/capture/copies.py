"""Copies of the user's model: structure copied, parameters viewing the original storage, buffers cloned; and what a
rewritten submodule keeps of the one it replaces (hooks, plain attributes)."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import torch
import torch.utils._pytree as pytree
from torch import nn

from fxsurgery.errors import InputError, one_line

__all__ = [
    "working_copy",
    "eval_copy",
    "widen_casts",
    "tensor_attributes",
    "keep_attributes",
    "hooked_containers",
    "HOOK_DICTS",
]


def tensor_attributes(module: nn.Module) -> list[tuple[nn.Module, str, torch.Tensor]]:
    """``(owner, name, tensor)`` for every tensor held as a plain attribute (not a parameter or buffer) in
    ``module`` and its submodules."""
    return [(m, k, v) for m in module.modules() for k, v in vars(m).items() if isinstance(v, torch.Tensor)]


def working_copy(module: nn.Module, clone_params: bool = False) -> Any:
    """Copy ``module``'s structure; parameters alias the original storage (or are cloned: ``clone_params``).

    New module objects (so ``train()``/``eval()``, hooks and attribute changes stay local), new ``Parameter`` objects
    viewing the same data (so no memory is copied and ``requires_grad`` is kept), cloned buffers (so BatchNorm
    statistics never move in the original).
    """
    memo: dict[int, Any] = {
        id(p): nn.Parameter(p.detach().clone() if clone_params else p.detach(), requires_grad=p.requires_grad)
        for p in module.parameters()
    }
    for _, _, v in tensor_attributes(module):  # computed ones (old-style weight_norm) cannot be deep-copied
        if not v.is_leaf:
            memo[id(v)] = v.detach()
    try:
        return copy.deepcopy(module, memo)
    except Exception as e:
        raise InputError(f"cannot copy the model ({one_line(e)}); fxsurgery never modifies the model in place") from e


def eval_copy(model: nn.Module, precision: Precision = "native") -> nn.Module:
    """A copy of ``model`` to run: eval mode, parameters and buffers its own (a forward that writes to its weights,
    such as ``nn.Embedding(max_norm=...)``, cannot reach the user's), converted to float64 (complex128) for proofs."""
    m = working_copy(model, clone_params=True).eval()
    if precision == "float64":
        m = m._apply(_to_float64)
    return m


def _to_float64(t: torch.Tensor) -> torch.Tensor:
    if t.is_complex():
        return t.to(torch.complex128)
    return t.to(torch.float64) if t.is_floating_point() else t


#: Float dtypes a graph may cast to, narrower than float64, and the methods that cast to them.
_NARROW = (torch.float32, torch.float16, torch.bfloat16)
_NARROW_METHODS = ("float", "half", "bfloat16")


def widen_casts(module: nn.Module) -> int:
    """Make every cast to a narrower float in the graphs of ``module`` (a float64 copy) a cast to float64, in place;
    the number of nodes changed.

    A captured graph holds the casts the model made at its own dtype as constants (``x.to(torch.float32)``, a
    ``dtype=`` of a factory op): in a float64 copy they would mix float32 with float64, or round the proof to float32.
    Both graphs of a float64 proof are widened alike, so they still compute the same program; reinterpreting views
    (``view(dtype)``) are left as they are."""
    changed = 0
    for graph_module in module.modules():
        if not isinstance(graph_module, torch.fx.GraphModule):
            continue
        for node in graph_module.graph.nodes:
            if node.op == "call_method" and node.target in _NARROW_METHODS:
                node.target, changed = "double", changed + 1
            elif _casts_narrow(node):
                node.args, node.kwargs = torch.fx.node.map_aggregate((node.args, node.kwargs), _wide)
                changed += 1
        graph_module.recompile()
    return changed


def _casts_narrow(node: torch.fx.Node) -> bool:
    """A call given a narrower float dtype (a cast, a factory's ``dtype=``), other than a reinterpreting view."""
    if node.op not in ("call_function", "call_method") or "view" in str(node.target):
        return False
    return any(_narrow(v) for v in pytree.tree_leaves((node.args, node.kwargs)))


def _narrow(value: Any) -> bool:
    return isinstance(value, torch.dtype) and value in _NARROW


def _wide(value: Any) -> Any:
    return torch.float64 if _narrow(value) else value


def hooked_containers(model: nn.Module) -> list[str]:
    """The outermost submodules with forward hooks that hold layers of their own."""
    out: list[str] = []
    for name, m in model.named_modules():
        hooked = m._forward_hooks or m._forward_pre_hooks
        if name and hooked and list(m.children()) and not any(name.startswith(f"{o}.") for o in out):
            out.append(name)
    return out


HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
)

if TYPE_CHECKING:
    from fxsurgery.options import Precision


def keep_attributes(new: nn.Module, old: nn.Module) -> None:
    """The replacement of a child keeps its hooks (they run on its calls as before) and its plain attributes (a
    conv's ``stride``, read by its parent's code)."""
    for key, value in vars(old).items():
        if not key.startswith("_") and key not in vars(new) and not isinstance(value, (nn.Module, torch.Tensor)):
            setattr(new, key, value)
    for key in HOOK_DICTS:
        if getattr(old, key, None):
            setattr(new, key, type(getattr(old, key))(getattr(old, key)))
