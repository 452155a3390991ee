"""self-attention (token_layout=True): nn.MultiheadAttention(x, x, x) becomes ConvSelfAttention on (B, C, 1, S)
(NumPy float64 reference of multi-head attention)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fxsurgery.engine.layers import ConvSelfAttention
from tests import reference
from tests.conftest import run_surgery


class Attention(nn.Module):
    def __init__(self, c=8, heads=2, batch_first=True, mask=False):
        super().__init__()
        self.attn = nn.MultiheadAttention(c, heads, batch_first=batch_first)
        self.register_buffer("mask", torch.zeros(5, 5, dtype=torch.bool) if mask else None)

    def forward(self, x):
        return self.attn(x, x, x, need_weights=False, attn_mask=self.mask)[0]


def _numpy_attention(x, mha):
    w = {k: v.detach().numpy() for k, v in mha.state_dict().items()}
    b, s, c = x.shape
    h, d = mha.num_heads, c // mha.num_heads
    q, k, v = reference.linear(x, w["in_proj_weight"], w["in_proj_bias"]).reshape(b, s, 3, h, d).transpose(2, 0, 3, 1, 4)
    out = (reference.softmax(q @ k.transpose(0, 1, 3, 2) / np.sqrt(d)) @ v).transpose(0, 2, 1, 3).reshape(b, s, c)
    return reference.linear(out, w["out_proj.weight"], w["out_proj.bias"])


def test_rewritten_and_equal_to_the_numpy_attention():
    model = Attention().eval().double()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    res = run_surgery("linear_to_conv", model, x, rewritten=["attn", "attn.out_proj"], token_layout=True)
    assert {s.name: s.pattern for s in res.sites} == {"attn": "self-attention", "attn.out_proj": "token-linear"}
    assert isinstance(res.module.get_submodule("attn"), ConvSelfAttention)
    with torch.no_grad():
        np.testing.assert_allclose(res.module(x).numpy(), _numpy_attention(x.numpy(), model.attn), rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "kwargs, reason",
    [({"mask": True}, "called with an attention mask"), ({"batch_first": False}, "batch_first=False")],
)
def test_skipped_with_the_reason(kwargs, reason):
    run_surgery("linear_to_conv", Attention(**kwargs).eval(), torch.randn(2, 5, 8), rewritten=[], token_layout=True,
                skipped={"attn": reason})  # fmt: skip
