"""Property-based tests: random heads and pointwise stacks are rewritten exactly (float64)."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from tests.conftest import FLATTEN_FORMS, run_surgery

ACTS = [nn.ReLU, nn.GELU, nn.SiLU, nn.Hardswish, nn.Tanh, nn.Identity]


class RandomHead(nn.Module):
    def __init__(self, c, h, w, hidden, bias, flatten, acts):
        super().__init__()
        self.conv = nn.Conv2d(2, c, 3, padding=1)
        self.flatten = flatten
        dims = [c * h * w, *hidden]
        layers = []
        for i, (a, b) in enumerate(zip(dims, dims[1:])):
            layers.append(nn.Linear(a, b, bias=bias))
            if i < len(hidden) - 1:
                layers.append(acts[i % len(acts)]())
        self.head = nn.Sequential(*layers)

    def forward(self, x):
        return self.head(FLATTEN_FORMS[self.flatten](self.conv(x)))


@settings(max_examples=60, deadline=None)
@given(
    c=st.integers(1, 6), h=st.integers(1, 4), w=st.integers(1, 4), n=st.integers(1, 3),
    hidden=st.lists(st.integers(1, 8), min_size=1, max_size=3), bias=st.booleans(),
    flatten=st.sampled_from(sorted(FLATTEN_FORMS)), acts=st.lists(st.sampled_from(ACTS), min_size=1, max_size=3),
)  # fmt: skip
def test_random_heads_rewrite_exactly(c, h, w, n, hidden, bias, flatten, acts):
    model = RandomHead(c, h, w, hidden, bias, flatten, acts).eval()
    names = [f"head.{i}" for i, m in enumerate(model.head) if isinstance(m, nn.Linear)]
    res = run_surgery("linear_to_conv", model, torch.randn(n, 2, h, w), rewritten=names)
    assert len([x for x in res.module.graph.nodes if x.target is torch.flatten]) == 1


@settings(max_examples=60, deadline=None)
@given(
    channels=st.lists(st.integers(1, 8), min_size=2, max_size=4), h=st.integers(1, 6), w=st.integers(1, 6),
    stride=st.integers(1, 3), bias=st.booleans(), act=st.sampled_from(ACTS),
)  # fmt: skip
def test_random_pointwise_stacks_rewrite_exactly(channels, h, w, stride, bias, act):
    layers = [nn.Conv2d(channels[0], channels[0], 3, padding=1)]
    for i, (a, b) in enumerate(zip(channels, channels[1:])):
        layers += [nn.Conv2d(a, b, 1, stride=stride if i == 0 else 1, bias=bias), act()]
    model = nn.Sequential(*layers).eval()
    names = [str(i) for i, m in enumerate(model) if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)]
    run_surgery("conv_to_linear", model, torch.randn(2, channels[0], h, w), rewritten=names)
