from __future__ import annotations

import copy
from collections.abc import Iterable

import pytest
import torch
import torch.utils._pytree as pytree
from torch import nn

import fxsurgery
from fxsurgery import _runtime

# Every flatten spelling the linear_to_conv rule must recognise.
FLATTEN_FORMS = {
    "torch.flatten": lambda x: torch.flatten(x, 1),
    "method flatten": lambda x: x.flatten(1),
    "view size(0)": lambda x: x.view(x.size(0), -1),
    "reshape shape[0]": lambda x: x.reshape(x.shape[0], -1),
    "view(-1, K)": lambda x: x.view(-1, x.shape[1] * x.shape[2] * x.shape[3]),
    "contiguous.view": lambda x: x.contiguous().view(x.size(0), -1),
}

# float64 comparisons of the rewritten model against the original: a correct rewrite agrees to ~1e-15 of the
# output scale; a wrong weight mapping is off by O(1).
EXACT_RTOL = 1e-10


def snapshot(model: nn.Module) -> dict:
    """Everything about a model that surgery must not change."""
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        "requires_grad": {k: p.requires_grad for k, p in model.named_parameters()},
        "training": {k: m.training for k, m in model.named_modules()},
        "modules": [(k, type(m)) for k, m in model.named_modules()],
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["modules"] == before["modules"]
    assert after["training"] == before["training"]
    assert after["requires_grad"] == before["requires_grad"]
    assert after["state"].keys() == before["state"].keys()
    for k, v in before["state"].items():
        assert torch.equal(after["state"][k], v), f"{k} changed"


def outputs_close(ref, got, rtol: float | None = EXACT_RTOL) -> float:
    """Max error relative to the output scale; asserts structure, shapes and dtypes are equal. ``rtol=None`` takes the
    documented tolerance of each output's dtype (``fxsurgery.RTOL``)."""
    ref_leaves, ref_spec = pytree.tree_flatten(ref)
    got_leaves, got_spec = pytree.tree_flatten(got)
    assert ref_spec == got_spec
    worst = 0.0
    for a, b in zip(ref_leaves, got_leaves):
        assert a.shape == b.shape and a.dtype == b.dtype
        scale = max(float(a.abs().max()), 1e-3)
        err = float((a.double() - b.double()).abs().max()) / scale
        bound = fxsurgery.RTOL[a.dtype] if rtol is None else rtol
        assert err <= bound, f"error {err:.3g} > {bound}"
        worst = max(worst, err)
    return worst


_LAYOUT_OPS = {"permute", "reshape", "view", "flatten", "t", "transpose", "squeeze", "unsqueeze", torch.flatten,
               torch.reshape, torch.permute}


# the spatial layout's helpers, with the layout ops each runs at a non-empty batch (a transpose and a reshape)
_LAYOUT_HELPERS = {_runtime.batch_to_width: 2, _runtime.maps_side_by_side: 2, _runtime.batch_from_width: 2}


def layout_ops(gm: torch.fx.GraphModule) -> int:
    """How many layout-changing ops (reshape, permute, flatten, ...) a graph runs."""
    calls = [n for n in gm.graph.nodes if n.op in ("call_method", "call_function")]
    return sum(n.target in _LAYOUT_OPS for n in calls) + sum(_LAYOUT_HELPERS.get(n.target, 0) for n in calls)


_MOVES = {"permute", "transpose", torch.permute, torch.transpose}


def moves(gm: torch.fx.GraphModule) -> int:
    """How many permutes and transposes a graph runs (the ops that move data; a reshape of them is a view)."""
    return sum(n.op in ("call_method", "call_function") and n.target in _MOVES for n in gm.graph.nodes)


def _deepcopy(model: nn.Module) -> nn.Module:
    """copy.deepcopy, also for modules holding computed tensors (old-style weight_norm's ``weight``)."""
    memo = {id(v): v.detach() for m in model.modules() for v in vars(m).values()
            if isinstance(v, torch.Tensor) and not v.is_leaf}  # fmt: skip
    return copy.deepcopy(model, memo)


def run_surgery(
    direction: str,
    model: nn.Module,
    inputs,
    *,
    rewritten: Iterable[str],
    skipped: dict[str, str] | None = None,
    **kwargs,
) -> fxsurgery.SurgeryResult:
    """Run a pass and check everything: graph lint, rewritten/skipped sites, exactness in float64 against the
    original model, and that neither the model nor the inputs changed."""
    inputs = inputs if isinstance(inputs, tuple) else (inputs,)
    before = snapshot(model)
    inputs_before = [t.clone() for t in inputs]
    kwargs.setdefault("precision", "float64")
    res = fxsurgery.rewrite(model, inputs, direction, **kwargs)
    for m in res.module.modules():  # the root, or the rewritten children of an untraceable root
        if isinstance(m, torch.fx.GraphModule):
            m.graph.lint()
    assert sorted(s.name for s in res.rewritten) == sorted(rewritten), res.summary()
    for s in res.skipped:
        assert s.reason, s
    if skipped is not None:
        got = {s.name: s.reason for s in res.skipped}
        assert got.keys() == skipped.keys(), res.summary()
        for name, fragment in skipped.items():
            assert fragment in got[name], f"{name}: {got[name]!r} lacks {fragment!r}"
    assert res.validation is not None and res.validation.passed
    # Independent check: the original model (not the tool's validation) in float64.
    prove = kwargs["precision"] == "float64"
    ref_model = _deepcopy(model).eval()
    new_model = _deepcopy(res.module).eval()
    x = inputs
    if prove:
        ref_model, new_model = ref_model.double(), new_model.double()
        x = tuple(t.double() if t.is_floating_point() else t for t in inputs)
    with torch.no_grad():
        outputs_close(ref_model(*[t.clone() for t in x]), new_model(*[t.clone() for t in x]), EXACT_RTOL if prove else None)
    assert_unchanged(model, before)
    for a, b in zip(inputs, inputs_before):
        assert torch.equal(a, b)
    return res


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
