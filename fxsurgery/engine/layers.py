"""Layers that rewritten graphs install in place of ones the token layout cannot express as a single conv.

They keep the parameter names of the layer they replace (so checkpoints map by name) and hold views of its
parameters, never copies.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from fxsurgery.engine.weights import linear_to_conv_weight

__all__ = ["ChannelsLastBatchNorm2d", "ConvSelfAttention", "conv_viewing_linear"]


def conv_viewing_linear(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    training: bool,
    feature: tuple[int, ...] | None = None,
    order: tuple[int, ...] | None = None,
    weight_map: Callable[..., torch.Tensor] = linear_to_conv_weight,
) -> nn.Conv2d:
    """A Conv2d whose kernel is a view of a Linear's ``weight`` (``(O, C*H*W)`` read as ``(O, C, H, W)`` for the map
    ``feature = (C, H, W)``, flattened in ``order``; 1x1 by default) and whose bias is the Linear's ``bias`` itself.
    The stride equals the kernel: with images side by side on the width axis, one window per image. ``weight_map``
    is the mapping of the weight (:func:`~fxsurgery.engine.weights.linear_to_conv_weight`)."""
    out_features, in_features = weight.shape
    feature = (in_features, 1, 1) if feature is None else feature
    kernel = (feature[1], feature[2])
    conv = nn.Conv2d(
        feature[0], out_features, kernel, stride=kernel, bias=bias is not None, device="meta", dtype=weight.dtype
    )
    kernel_view = weight_map(weight.detach(), feature, order)
    conv.weight = nn.Parameter(kernel_view, requires_grad=weight.requires_grad)
    if bias is not None:
        conv.bias = bias
    conv.train(training)
    return conv


class ConvSelfAttention(nn.Module):
    """``nn.MultiheadAttention`` self-attention (``batch_first=True``, no masks) on tokens carried as ``(B, C, 1, S)``.

    The q/k/v projection is one 1x1 convolution whose weight is ``in_proj_weight`` viewed as ``(3C, C, 1, 1)``, and
    ``out_proj`` is a ``Conv2d(C, C, 1)`` whose weight is the original ``out_proj.weight`` viewed as ``(C, C, 1, 1)``.
    Attention runs per head on ``(B, heads, head_dim, S)`` without transposing the activations (the layout of
    Apple's ANE reference transformers). Attention dropout is applied in training mode, as in the original.
    """

    def __init__(self, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        c = mha.embed_dim
        self.embed_dim, self.num_heads, self.dropout = c, mha.num_heads, mha.dropout
        w = mha.in_proj_weight
        self.in_proj_weight = nn.Parameter(w.detach().view(3 * c, c, 1, 1), requires_grad=w.requires_grad)
        self.in_proj_bias = mha.in_proj_bias
        out = mha.out_proj
        self.out_proj = conv_viewing_linear(out.weight, out.bias, out.training)
        self.train(mha.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c, s = x.shape[1], x.shape[3]
        h = self.num_heads
        d = c // h
        qkv = F.conv2d(x, self.in_proj_weight, self.in_proj_bias)  # (B, 3C, 1, S)
        q, k, v = qkv.reshape(-1, 3, h, d, s).unbind(1)  # each (B, heads, head_dim, S)
        scores = torch.matmul(q.transpose(-1, -2), k) * (float(d) ** -0.5)  # (B, heads, S_query, S_key)
        weights = F.dropout(scores.softmax(-1), self.dropout, self.training)
        out = torch.matmul(v, weights.transpose(-1, -2))  # (B, heads, head_dim, S_query)
        return self.out_proj(out.reshape(-1, c, 1, s))

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, dropout={self.dropout}"


class ChannelsLastBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` on a map carried channels-last, ``(N, H, W, C)``, holding the very same parameters and
    buffers (same names, so checkpoints load unchanged).

    In eval mode with running statistics it is a per-channel affine on the last dim, ``x * s + t`` with
    ``s = weight / sqrt(var + eps)`` and ``t = bias - mean * s``: no transpose. In training mode (or without running
    statistics) it runs the original ``BatchNorm2d`` on the NCHW view, so batch statistics and running-stat updates
    are exactly the original's.
    """

    @classmethod
    def sharing(cls, bn: nn.BatchNorm2d) -> ChannelsLastBatchNorm2d:
        """A channels-last twin of ``bn`` whose parameters and buffers are ``bn``'s own tensors."""
        new = cls.__new__(cls)
        # the same tensors; its own containers (parameter and buffer dicts, hook dicts), so neither module's
        # registrations leak into the other
        new.__dict__.update({k: copy.copy(v) if isinstance(v, (dict, set)) else v for k, v in bn.__dict__.items()})
        new._modules = {}
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training or self.running_mean is None or self.running_var is None:
            return super().forward(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        scale = torch.rsqrt(self.running_var + self.eps)  # per channel, folded to constants at export
        if self.weight is not None:
            scale = scale * self.weight
        shift = -self.running_mean * scale
        if self.bias is not None:
            shift = shift + self.bias
        return x * scale + shift  # two passes over the activations
