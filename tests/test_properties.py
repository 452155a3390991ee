"""Property-based fuzzing (hypothesis): random CNNs with random heads and random pointwise stacks.

Exactness is checked in float64 (``precision="float64"``: agreement to 1e-10 of the output scale) and the tolerance
policy in float32, against the original model. The default run draws a few hundred examples; the marked slow run
(``pytest -m slow``) draws many more.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from tests.conftest import FLATTEN_FORMS, layout_ops, run_surgery

ACTS = [nn.ReLU, nn.GELU, nn.SiLU, nn.Hardswish, nn.Tanh, nn.Identity, nn.Dropout]
HEAD_INPUTS = {
    **FLATTEN_FORMS,
    "nhwc flatten": lambda x: x.permute(0, 2, 3, 1).flatten(1),
    "mean": lambda x: x.mean([2, 3]),
}
PRECISIONS = ["float64", "native"]
DEFAULT, SLOW = 200, 1500


class RandomHead(nn.Module):
    def __init__(self, c, h, w, hidden, bias, head_input, acts):
        super().__init__()
        self.conv = nn.Conv2d(2, c, 3, padding=1)
        self.head_input = head_input
        features = c if head_input == "mean" else c * h * w
        dims = [features, *hidden]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(dims, dims[1:])):
            layers.append(nn.Linear(a, b, bias=bias))
            if i < len(hidden) - 1:
                layers.append(acts[i % len(acts)]())
        self.head = nn.Sequential(*layers)

    def forward(self, x):
        return self.head(HEAD_INPUTS[self.head_input](self.conv(x)))


heads = dict(
    c=st.integers(1, 6), h=st.integers(1, 4), w=st.integers(1, 4), n=st.integers(1, 3),
    hidden=st.lists(st.integers(1, 8), min_size=1, max_size=3), bias=st.booleans(),
    head_input=st.sampled_from(sorted(HEAD_INPUTS)), acts=st.lists(st.sampled_from(ACTS), min_size=1, max_size=3),
    precision=st.sampled_from(PRECISIONS),
)  # fmt: skip
stacks = dict(
    channels=st.lists(st.integers(1, 8), min_size=2, max_size=4), h=st.integers(1, 6), w=st.integers(1, 6),
    stride=st.integers(1, 3), bias=st.booleans(), act=st.sampled_from(ACTS), precision=st.sampled_from(PRECISIONS),
)  # fmt: skip


def check_head(c, h, w, n, hidden, bias, head_input, acts, precision):
    torch.manual_seed(0)  # the same example draws the same weights and inputs when hypothesis replays it
    model = RandomHead(c, h, w, hidden, bias, head_input, acts).eval()
    names = [f"head.{i}" for i, m in enumerate(model.head) if isinstance(m, nn.Linear)]
    res = run_surgery("linear_to_conv", model, torch.randn(n, 2, h, w), rewritten=names, precision=precision)
    # one conversion in (permute + reshape for an HxW map; flatten + t + reshape, a 2-D transpose that onnxruntime
    # runs faster, for a 1x1 map) and one out (flatten + t), none between sites
    assert layout_ops(res.module) <= 5, res.module.code


def check_stack(channels, h, w, stride, bias, act, precision):
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Conv2d(channels[0], channels[0], 3, padding=1)]
    for i, (a, b) in enumerate(zip(channels, channels[1:])):
        layers += [nn.Conv2d(a, b, 1, stride=stride if i == 0 else 1, bias=bias), act()]
    model = nn.Sequential(*layers).eval()
    names = [str(i) for i, m in enumerate(model) if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)]
    run_surgery("conv_to_linear", model, torch.randn(2, channels[0], h, w), rewritten=names, precision=precision)


_fast = settings(max_examples=DEFAULT, deadline=None, suppress_health_check=[HealthCheck.too_slow])
_slow = settings(max_examples=SLOW, deadline=None, suppress_health_check=[HealthCheck.too_slow])

test_random_heads = _fast(given(**heads)(check_head))
test_random_pointwise_stacks = _fast(given(**stacks)(check_stack))
test_random_heads_slow = pytest.mark.slow(_slow(given(**heads)(check_head)))
test_random_pointwise_stacks_slow = pytest.mark.slow(_slow(given(**stacks)(check_stack)))
