"""A float64 proof of an exported graph: the casts torch.export recorded at the model's own dtype (an RMSNorm's
``x.to(torch.float32)`` ... ``.to(input_dtype)``) are constants of the graph, widened to float64 in both graphs so the
proof runs in float64 throughout."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

import fxsurgery
from fxsurgery.capture.copies import eval_copy, widen_casts
from tests import reference


class RMSNorm(nn.Module):
    """The decoders' RMSNorm: computed in float32 whatever the model's dtype, cast back to it."""

    def forward(self, x):
        dtype = x.dtype
        x = x.to(torch.float32)
        return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.norm, self.fc2 = nn.Linear(8, 16), RMSNorm(), nn.Linear(16, 4)

    def forward(self, x):
        return self.fc2(self.norm(self.fc1(x)))


def _block_and_tokens():
    torch.manual_seed(0)
    return Block().eval(), torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(1))


def _numpy_float64(block: Block, x: torch.Tensor) -> np.ndarray:
    params = {k: v.detach().double().numpy() for k, v in block.state_dict().items()}
    h = reference.linear(x.double().numpy(), params["fc1.weight"], params["fc1.bias"])
    h = h / np.sqrt((h**2).mean(-1, keepdims=True) + 1e-6)
    return reference.linear(h, params["fc2.weight"], params["fc2.bias"])


def test_widened_captured_graph_computes_in_float64_throughout():
    """The exported graph's casts are float32 constants: in a float64 copy they round the middle of the block to
    float32 (or, before a Linear, mix dtypes); widened, the graph agrees with NumPy in float64."""
    block, x = _block_and_tokens()
    graph = torch.export.export(block, (x,)).module()
    want = _numpy_float64(block, x)
    as_is = eval_copy(graph, "float64")
    with torch.no_grad():
        try:
            rounded = np.abs(as_is(x.double()).numpy() - want).max()
        except RuntimeError:  # float32 into a float64 Linear
            rounded = np.inf
    assert rounded > 1e-9  # the cast constants at work: not a float64 computation
    widened = eval_copy(graph, "float64")
    assert widen_casts(widened) >= 2
    with torch.no_grad():
        got = widened(x.double())
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-13)


def test_float64_proof_of_an_exported_block_with_casts_is_exact():
    """Both graphs widened alike: the proof runs (without the widening, the norm's cast back to the captured dtype
    feeds float32 into a float64 Linear and the proof stops: "the original model fails ... in float64")."""
    block, x = _block_and_tokens()
    res = fxsurgery.linear_to_conv(block, x, token_layout=True, frontend="export", precision="float64")
    assert {s.name for s in res.rewritten} == {"fc1", "fc2"}, res.summary()
    assert res.validation.passed and res.validation.max_rel_error < 1e-12
    assert any("in both graphs they cast to float64" in n for n in res.validation.notes)
    assert type(block.norm) is RMSNorm and block.fc1.weight.dtype == torch.float32  # the user's model is untouched
    torch.testing.assert_close(res.module(x), block(x))
