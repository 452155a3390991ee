"""Layers recognised by what they are rather than by their class, so their libraries need not be imported."""

from __future__ import annotations

import copy
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from fxsurgery.capture.copies import working_copy
from fxsurgery.errors import one_line

__all__ = ["is_transposed_linear", "linear_layers", "plain_linears", "fused_experts"]


def is_transposed_linear(mod: object) -> bool:
    """transformers' ``Conv1D`` (GPT-2, GPT, CTRL...): ``x @ W + b`` with ``W`` of shape ``(in, out)`` computed by
    ``addmm``, a Linear whose weight is stored transposed. Recognised by its name and attributes, so transformers is
    not imported."""
    # read from the parameter dict: under fx tracing, module attribute access returns proxies
    weight = mod._parameters.get("weight") if isinstance(mod, nn.Module) else None
    return (
        type(mod).__name__ == "Conv1D"
        and isinstance(weight, torch.Tensor)
        and tuple(weight.shape) == (getattr(mod, "nx", None), getattr(mod, "nf", None))
    )


def linear_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every layer of ``model`` that computes a Linear: ``nn.Linear`` and its subclasses, transformers' ``Conv1D``."""
    return {n: m for n, m in model.named_modules() if n and (isinstance(m, nn.Linear) or is_transposed_linear(m))}


def fused_experts(model: nn.Module) -> dict[str, str]:
    """Mixture-of-experts layers that hold their experts' weights fused, one 3-D ``(experts, out, in)`` parameter
    per projection (Mixtral, Qwen2-MoE, DeepSeek in transformers 5), and a description of those weights."""
    out = {}
    for name, mod in model.named_modules():
        fused = {k: tuple(p.shape) for k, p in mod.named_parameters(recurse=False) if p.dim() == 3}
        if name and fused and "expert" in type(mod).__name__.lower():
            out[name] = ", ".join(f"{k} {shape}" for k, shape in fused.items())
    return out


def _subclass(mod: nn.Module) -> bool:
    """A Linear subclass of another library or of the user (torch's own, such as ``MultiheadAttention``'s
    ``out_proj`` class, stay what they are: their owners may test for them)."""
    return isinstance(mod, nn.Linear) and not type(mod).__module__.startswith("torch.")


#: What a Linear subclass may define and still be read as a plain Linear once its forward is checked.
_PLAIN_MEMBERS = {"__init__", "forward", "__module__", "__qualname__", "__doc__", "__annotations__", "__firstlineno__"}
_PLAIN_MEMBERS |= {"__static_attributes__", "__dict__", "__weakref__", "__orig_bases__", "__parameters__"}


def plain_linears(model: nn.Module) -> tuple[nn.Module, dict[str, str], list[str]]:
    """``model`` with each Linear subclass that computes exactly a Linear (Falcon's ``FalconLinear``: ``x @ W.T + b``)
    and defines nothing but ``__init__`` and ``forward`` made a plain ``nn.Linear`` in a copy, so both front ends see
    a Linear call and the rules can rewrite it. Returns the model (the one given when nothing changes), why each
    other subclass stays as it is, and a note naming the subclasses made plain. Checked by running the subclass's
    forward in float64 on a copy of the layer against ``F.linear``: no hook runs, the layer given is not touched."""
    own = {n: m for n, m in model.named_modules() if n and _subclass(m)}
    if not own:
        return model, {}, []
    kept = {n: why for n, m in own.items() if (why := _not_a_linear(cast(nn.Linear, m)))}
    plain = [n for n in own if n not in kept]
    if not plain:
        return model, kept, []
    copy_ = working_copy(model)
    for name in plain:
        copy_.get_submodule(name).__class__ = nn.Linear
    kinds = sorted({type(own[n]).__name__ for n in plain})
    note = (
        f"{', '.join(kinds)} ({len(plain)} layer(s)): Linear subclass(es) whose forward computes x @ W.T + b "
        "(checked in float64 on a random input): rewritten as nn.Linear layers"
    )
    return copy_, kept, [note]


def _not_a_linear(mod: nn.Linear) -> str | None:
    """Why the Linear subclass ``mod`` cannot be read as a plain Linear, or None when its forward computes one."""
    kind = type(mod).__name__
    extra = sorted(
        k for c in type(mod).__mro__[: type(mod).__mro__.index(nn.Linear)] for k in vars(c) if k not in _PLAIN_MEMBERS
    )
    if extra:
        return f"{kind} is a Linear subclass that defines {', '.join(extra[:3])}: a plain Linear would lack them"
    if list(mod.children()):
        return f"{kind} is a Linear subclass with layers inside (fake quantization?)"
    if mod.weight.device.type == "meta":
        return f"{kind} is a Linear subclass, whose forward cannot be checked on the meta device"
    try:
        probe = copy.deepcopy(mod).double()
        x = torch.randn(2, 3, mod.in_features, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            got = type(mod).forward(probe, x)
            want = F.linear(x, probe.weight, probe.bias)
        exact = isinstance(got, torch.Tensor) and got.shape == want.shape and torch.allclose(got, want, 1e-10, 1e-12)
    except Exception as e:  # its forward wants other inputs, or fails in float64
        exact = False
        kind = f"{kind} ({one_line(e)})"
    if exact:
        return None
    return f"{kind} is a Linear subclass whose forward does not compute x @ W.T + b"
