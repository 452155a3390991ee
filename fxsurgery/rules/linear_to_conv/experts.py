"""``moe-experts`` (token layout): fused mixture-of-experts weights (transformers 5's Mixtral, Qwen2/3-MoE, OLMoE,
DeepSeek...: ``gate_up_proj (E, 2I, C)`` and ``down_proj (E, C, I)`` applied per routed token) computed densely as
two convolutions over every token:

* ``gate_up``: one 1x1 conv ``(E*2I, C)`` viewing ``gate_up_proj``, on the tokens as ``(1, C, 1, T)`` (with
  ``batch_layout="batch"``: ``(T, C, 1, 1)``, which needs no transpose of the rows);
* ``down``: one grouped 1x1 conv (``groups=E``) viewing ``down_proj``, giving each expert's output ``(1, E*C, 1, T)``;
* the routing weights scattered to ``(E, 1, T)`` (zero where an expert was not picked) weigh and sum them.

An expert not picked adds an exact zero, so the sum is the routed one; every expert runs on every token, so the
experts cost ``E/k`` times the routed FLOPs (Mixtral: 8/2) in one static graph, which an NPU runs where the routed
form's data-dependent dispatch (``nonzero``, ``index_add_``, grouped matmuls) does not lower. Exclude the site to
keep the routed form.

The dispatch depends on ``config._experts_implementation`` (an eager loop, batched or grouped products), each
captured differently, so the layer is replaced in the working copy before capture (as
:func:`~fxsurgery.capture.layers.plain_linears` does for Linear subclasses): its parameters keep their names and
shapes (a checkpoint loads as it is), and the new forward is checked against the layer's own on a small probe with
the same number of experts (float64, or float32 where the dispatch runs in float32 only).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, cast

import torch
import torch.nn.functional as F
from torch import nn

from fxsurgery.capture.copies import working_copy
from fxsurgery.capture.layers import fused_experts
from fxsurgery.errors import one_line
from fxsurgery.report import Site

__all__ = ["PATTERN", "NOTE", "DenseExperts", "dense_experts", "for_group"]

PATTERN = "moe-experts"
#: What the validation of a model with dense experts shows, and how.
NOTE = (
    "moe-experts: the fused experts were made dense before capture; each layer's own forward equals the dense form "
    "on a probe (its class, random weights, float64 where it runs in float64), the model with them is compared with "
    "the original by the validation, and a float64 proof of an exported graph covers the rewrite after them"
)

#: transformers' ``@use_experts_implementation`` flags, and the value the dense form is written for.
_FLAGS = {"has_gate": True, "has_bias": False, "is_transposed": False, "is_concatenated": True}
_FLAGS |= {"has_post_expert_norm": False, "_is_expert_parallel": False}
#: How the T tokens (rows) are laid out for the convolutions, per ``batch_layout``.
_TOKENS = {"spatial": "(1,C,1,T)", "batch": "(T,C,1,1)"}


class DenseExperts(nn.Module):
    """Every expert on every token as two 1x1 convolutions viewing the fused weights (see the module docstring).
    ``forward(hidden_states (T, C), top_k_index (T, k), top_k_weights (T, k)) -> (T, C)``, as the layer it replaces."""

    def __init__(
        self,
        gate_up_proj: nn.Parameter,
        down_proj: nn.Parameter,
        act_fn: Callable[..., torch.Tensor],
        layout: str = "spatial",
    ):
        super().__init__()
        self.experts, self.channels, self.inner = down_proj.shape
        self.gate_up_proj, self.down_proj, self.act_fn, self.layout = gate_up_proj, down_proj, act_fn, layout

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        e, c, i = self.experts, self.channels, self.inner
        picked = top_k_index.unsqueeze(-1) == torch.arange(e, device=top_k_index.device)  # (T, k, E)
        route = (picked.to(top_k_weights.dtype) * top_k_weights.unsqueeze(-1)).sum(1)  # (T, E): 0 where not picked
        if self.layout == "batch":  # the tokens along the batch axis, (T, C, 1, 1): no transpose
            h = F.conv2d(hidden_states.reshape(-1, c, 1, 1), self.gate_up_proj.view(e * 2 * i, c, 1, 1))
            h = h.view(-1, e, 2, i)
            h = (self.act_fn(h[:, :, 0]) * h[:, :, 1]).reshape(-1, e * i, 1, 1)
            y = F.conv2d(h, self.down_proj.view(e * c, i, 1, 1), groups=e).view(-1, e, c)
            return (y * route.unsqueeze(-1)).sum(1).to(hidden_states.dtype)
        x = hidden_states.t().reshape(1, c, 1, -1)  # the T tokens along the sequence axis of (B, C, 1, S)
        h = F.conv2d(x, self.gate_up_proj.view(e * 2 * i, c, 1, 1)).view(e, 2, i, -1)
        h = (self.act_fn(h[:, 0]) * h[:, 1]).reshape(1, e * i, 1, -1)
        y = F.conv2d(h, self.down_proj.view(e * c, i, 1, 1), groups=e).view(e, c, -1)
        return (y * route.t().unsqueeze(1)).sum(0).t().to(hidden_states.dtype)

    def extra_repr(self) -> str:
        e, c, i = self.experts, self.channels, self.inner
        convs = f"gate_up: Conv2d({c}, {e * 2 * i}, kernel=1x1), down: Conv2d({e * i}, {e * c}, kernel=1x1, groups={e})"
        return f"{convs}, tokens as {_TOKENS[self.layout]}"


def dense_experts(
    model: nn.Module, direction: str, options: Options, skip: Mapping[str, str]
) -> tuple[nn.Module, list[Site], list[str]]:
    """``model`` with each fused-experts layer (:func:`~fxsurgery.capture.layers.fused_experts`) that computes the
    dense form replaced by a :class:`DenseExperts` in a copy (the model given when none is; the tokens laid out as
    ``options.batch_layout`` says), and a site for every fused-experts layer: rewritten, or skipped with why
    (``options.exclude``: the caller's; ``skip``: pattern -> why, a deployment target's), and :data:`NOTE` when one
    was replaced. Only ``direction`` ``"linear_to_conv"`` lists and replaces them, with ``options.token_layout``."""
    sites: list[Site] = []
    dense: list[str] = []
    if direction != "linear_to_conv":
        return model, sites, []
    layout = options.batch_layout
    for name, weights in fused_experts(model).items():
        mod = model.get_submodule(name)
        why = (
            "excluded by the caller"
            if name in options.exclude
            else skip.get(PATTERN)
            or (None if options.token_layout else "rewritten with token_layout=True, the layout of its convolutions")
            or _not_dense(mod, layout)
        )
        if why:
            sites.append(Site(name, PATTERN, "skipped", f"fused expert weights ({weights}): {why}"))
            continue
        e, c, i = _shape(mod)
        k = getattr(getattr(mod, "config", None), "num_experts_per_tok", None)
        cost = f"every expert on every token ({e}/{k} times the routed FLOPs)" if k else "every expert on every token"
        after = f"Conv2d({c}, {e * 2 * i}, 1x1) + Conv2d({e * i}, {e * c}, 1x1, groups={e}), {cost} {_TOKENS[layout]}"
        sites.append(Site(name, PATTERN, "rewritten", before=weights, after=after, calls=2))
        dense.append(name)
    if not dense:
        return model, sites, []
    out = working_copy(model)
    for name in dense:
        out.set_submodule(name, _dense_of(out.get_submodule(name), layout))
    return out, sites, [NOTE]


def for_group(
    structure: nn.Module, rewritten: Sequence[Site], options: Options, exclude: Sequence[str], skip: Mapping[str, str]
) -> tuple[nn.Module, bool]:
    """The model the culprit search rewrites to try a group of sites (the sites ``exclude`` left out): ``structure``
    with the experts of the group made dense, and whether its graph must be captured again (an experts site is left
    out, so the graph differs from the one captured with all of them)."""
    ours = [s.name for s in rewritten if s.pattern == PATTERN]
    if not ours:
        return structure, False
    group = dataclasses.replace(options, exclude=tuple(exclude), token_layout=True)
    return dense_experts(structure, "linear_to_conv", group, skip)[0], any(n in exclude for n in ours)


def _not_dense(mod: nn.Module, layout: str) -> str | None:
    """Why the fused-experts layer ``mod`` cannot be computed densely as written, or None when its own forward equals
    :class:`DenseExperts` on a small probe (:func:`_same_on_probe`), in float64 (float32 where its dispatch runs in
    float32 only)."""
    params = dict(mod.named_parameters(recurse=False))
    if set(params) != {"gate_up_proj", "down_proj"}:
        return f"parameters {', '.join(sorted(params))}, where the dense form knows gate_up_proj and down_proj"
    flags = [f"{k}={getattr(mod, k)!r}" for k, v in _FLAGS.items() if getattr(mod, k, v) != v]
    if flags:
        return f"{', '.join(flags)}: the dense form is written for gated, concatenated, untransposed experts"
    e, _, i = _shape(mod)
    if params["gate_up_proj"].shape[:2] != (e, 2 * i) or not callable(getattr(mod, "act_fn", 0)):
        return "gate_up_proj is not (E, 2I, C) for a down_proj (E, C, I), or the layer has no act_fn"
    try:
        exact = _same_on_probe(mod, layout, torch.float64)
    except Exception:  # some dispatches run in float32 only (transformers' grouped_mm on CPU)
        try:
            exact = _same_on_probe(mod, layout, torch.float32)
        except Exception as err:  # its forward wants other inputs
            return f"its forward could not be checked against the dense form ({one_line(err)})"
    return None if exact else "its forward does not compute the dense form (checked on a small probe)"


def _same_on_probe(mod: nn.Module, layout: str, dtype: torch.dtype) -> bool:
    """Whether ``mod``'s own forward equals :class:`DenseExperts` on a probe: its class, attributes and number of
    experts, small random weights (8 channels, 4 inner) in ``dtype``, 6 tokens routed to 2 experts each."""
    e = _shape(mod)[0]
    probe = copy.copy(mod)
    gen = torch.Generator().manual_seed(0)
    probe._parameters = {
        "gate_up_proj": nn.Parameter(torch.randn(e, 8, 8, dtype=dtype, generator=gen)),
        "down_proj": nn.Parameter(torch.randn(e, 8, 4, dtype=dtype, generator=gen)),
    }
    x = torch.randn(6, 8, dtype=dtype, generator=gen)
    k = min(2, e)
    index = torch.rand(6, e, generator=gen).topk(k, dim=-1).indices
    weights = torch.rand(6, k, dtype=dtype, generator=gen)
    with torch.no_grad():
        want = type(mod).forward(probe, x, index, weights)
        got = _dense_of(probe, layout)(x, index, weights)
    tol = (1e-10, 1e-12) if dtype == torch.float64 else (1e-5, 1e-6)
    return isinstance(want, torch.Tensor) and want.shape == got.shape and torch.allclose(got, want, *tol)


def _shape(mod: nn.Module) -> tuple[int, int, int]:
    """``(experts, channels, inner)`` of the fused-experts layer ``mod``: its ``down_proj`` is ``(E, C, I)``."""
    e, c, i = mod._parameters["down_proj"].shape  # type: ignore[union-attr]
    return e, c, i


def _dense_of(mod: nn.Module, layout: str = "spatial") -> DenseExperts:
    """The dense form of the fused-experts layer ``mod``, on its own parameters and activation."""
    p = mod._parameters
    act = cast(Callable[..., torch.Tensor], mod.act_fn)
    return DenseExperts(cast(nn.Parameter, p["gate_up_proj"]), cast(nn.Parameter, p["down_proj"]), act, layout)


if TYPE_CHECKING:
    from fxsurgery.options import Options
