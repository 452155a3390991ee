"""The inputs a submodule receives when the whole model runs: how an untraceable model's children, and ``auto``'s
blocks, get example inputs of their own."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from fxsurgery.capture.copies import eval_copy
from fxsurgery.errors import TraceError

__all__ = ["capture_submodule_inputs"]


def capture_submodule_inputs(
    model: nn.Module, inputs: tuple[torch.Tensor, ...], names: Sequence[str]
) -> tuple[dict[str, tuple[torch.Tensor, ...]], dict[str, str]]:
    """The positional tensor inputs each submodule ``names`` receives when ``model`` runs on ``inputs`` (one real
    run of an eval-mode copy), and why the others cannot be captured."""
    probe = eval_copy(model, "native")
    calls: dict[str, list[tuple[tuple, dict]]] = {n: [] for n in names}
    handles = []
    for name in names:

        def hook(mod: nn.Module, args: tuple, kwargs: dict, name: str = name) -> None:
            calls[name].append((args, kwargs))

        handles.append(probe.get_submodule(name).register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            probe(*[t.clone() for t in inputs])
    except Exception as e:
        raise TraceError(f"the model fails on the example inputs: {type(e).__name__}: {e}") from e
    finally:
        for h in handles:
            h.remove()
    captured: dict[str, tuple[torch.Tensor, ...]] = {}
    skipped: dict[str, str] = {}
    for name, seen in calls.items():
        why = _uncapturable(seen)
        if why:
            skipped[name] = why
        else:
            captured[name] = tuple(a.detach().clone() for a in seen[0][0])
    return captured, skipped


def _uncapturable(seen: list[tuple[tuple, dict[str, Any]]]) -> str:
    if not seen:
        return "not called on the example inputs"
    if len(seen) > 1:
        return f"called {len(seen)} times (a shared module)"
    args, kwargs = seen[0]
    if kwargs or not args or not all(isinstance(a, torch.Tensor) for a in args):
        return "called with keyword or non-tensor arguments"
    return ""
