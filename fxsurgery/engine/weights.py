"""Weight mappings between Linear and convolution layouts, as pure functions on tensors.

Every function returns a *view* of its argument where the memory layout allows it (no copy), so a rewritten model
shares storage with the original.

The maths:

* ``Linear(C*H*W -> O)`` on ``flatten(Y)``, ``Y`` of shape ``(N, C, H, W)``, computes
  ``y[n, o] = b[o] + sum_{c,h,w} W[o, c*H*W + h*W + w] * Y[n, c, h, w]``, which is exactly a ``Conv2d(C, O, (H, W))``
  with kernel ``K[o, c, h, w] = W[o, c*H*W + h*W + w]``, i.e. ``W.view(O, C, H, W)``, evaluated at its single output
  position.
* If ``Y`` was permuted before the flatten (``Y.permute(0, 2, 3, 1).flatten(1)``, channels-last), the flattened index
  runs over the permuted dims, so the kernel is ``W.view(O, H, W, C).permute(0, 3, 1, 2)``: still a view.
* A 1x1 ``Conv2d(C, O)`` with kernel ``K`` of shape ``(O, C, 1, 1)`` computes
  ``y[n, o, h, w] = b[o] + sum_c K[o, c] x[n, c, h, w]``: a ``Linear(C -> O)`` with weight ``K.view(O, C)`` applied
  to every pixel.
* A ``ConvTranspose2d(C, O, 1)`` stores its kernel as ``(C, O, 1, 1)``; the Linear weight is ``K.view(C, O).t()``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = [
    "linear_to_conv_weight",
    "conv_to_linear_weight",
    "conv_transpose_to_linear_weight",
    "shares_storage",
]


def linear_to_conv_weight(
    weight: torch.Tensor, feature_shape: Sequence[int], flatten_order: Sequence[int] | None = None
) -> torch.Tensor:
    """Map a Linear weight ``(O, C*H*W)`` to a conv kernel ``(O, C, H, W)`` (any number of feature dims).

    ``feature_shape`` is ``(C, H, W)`` of the NCHW map the convolution reads. ``flatten_order`` lists, for each
    flattened dim, which of those feature dims it is (``(1, 2, 0)`` for a channels-last flatten); default in order.
    """
    feature_shape = tuple(int(d) for d in feature_shape)
    order = tuple(range(len(feature_shape))) if flatten_order is None else tuple(flatten_order)
    if sorted(order) != list(range(len(feature_shape))):
        raise ValueError(f"flatten_order {order} is not a permutation of {len(feature_shape)} feature dims")
    if weight.dim() != 2 or weight.shape[1] != math.prod(feature_shape):
        raise ValueError(f"Linear weight of shape {tuple(weight.shape)} does not flatten a {feature_shape} map")
    flat_shape = tuple(feature_shape[d] for d in order)
    w = weight.view(weight.shape[0], *flat_shape)
    if order == tuple(range(len(order))):
        return w
    return w.permute(0, *(1 + order.index(d) for d in range(len(order))))


def conv_to_linear_weight(weight: torch.Tensor) -> torch.Tensor:
    """Map a conv kernel ``(O, C, *k)`` to a Linear weight ``(O, C*prod(k))`` (flattened in C-major order)."""
    return weight.reshape(weight.shape[0], -1)


def conv_transpose_to_linear_weight(weight: torch.Tensor) -> torch.Tensor:
    """Map a 1x1 transposed-conv kernel ``(C, O, 1, ..)`` to a Linear weight ``(O, C)`` (a transposed view)."""
    if any(k != 1 for k in weight.shape[2:]):
        raise ValueError(f"only 1x1 transposed-conv kernels map to a Linear, got {tuple(weight.shape)}")
    return weight.reshape(weight.shape[0], weight.shape[1]).t()


def shares_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when ``a`` and ``b`` view the same memory (neither was copied)."""
    if a.device.type == "meta" or b.device.type == "meta":
        return False
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
