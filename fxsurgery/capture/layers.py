"""Layers recognised by what they are rather than by their class, so their libraries need not be imported."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["is_transposed_linear"]


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
