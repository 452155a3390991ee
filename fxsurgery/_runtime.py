"""Functions that rewritten graphs call at run time. They must stay importable under these names."""

from __future__ import annotations

import torch

__all__ = ["check_spatial_size", "layer_norm_channels"]


def check_spatial_size(
    x: torch.Tensor, expected: tuple[int, ...], site: str, original_rejects: bool = True
) -> torch.Tensor:
    """Return ``x`` unchanged if its trailing spatial dims equal ``expected``; else raise like the original would.

    A rewritten site is exact only at the feature-map size it was traced with: an HxW convolution that replaced a
    Linear on a flattened map would otherwise accept a bigger image and return a bigger map where the original raised.
    Where the original accepts other sizes (a full-extent Conv2d turned into a Linear), the message says to rewrite
    again at the new size.
    """
    got = tuple(x.shape[2:])
    if got != tuple(expected):
        size = "x".join(str(d) for d in expected)
        raise RuntimeError(
            f"fxsurgery: site {site!r} was rewritten for a {size} feature map but got "
            f"{'x'.join(str(int(d)) for d in got)}; "
            + (
                "the original model rejects this input size too"
                if original_rejects
                else "the rewrite is exact only at the traced size: rewrite again with example inputs of this size"
            )
        )
    return x


def layer_norm_channels(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> torch.Tensor:
    """``LayerNorm`` over dim 1 (the channels of an NCHW map, or of an ``(N, C, 1, 1)`` value).

    The NCHW equivalent of ``x.permute(0, 2, 3, 1)`` -> ``LayerNorm(C)`` -> ``permute(0, 3, 1, 2)``, written with
    reductions over dim 1 so no transpose is needed (biased variance, as ``F.layer_norm``).
    """
    mean = x.mean(1, keepdim=True)
    centered = x - mean
    y = centered * torch.rsqrt(centered.pow(2).mean(1, keepdim=True) + eps)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    if weight is not None:
        y = y * weight.reshape(shape)
    if bias is not None:
        y = y + bias.reshape(shape)
    return y
