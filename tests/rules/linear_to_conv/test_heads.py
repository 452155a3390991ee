"""Attention carried per head (token_layout=True): HuggingFace-style ``Linear -> view -> transpose -> SDPA ->
transpose -> reshape -> Linear`` runs on (B, C, 1, S) tokens with no transpose of the activations (NumPy float64
reference of masked multi-head attention)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fxsurgery import _runtime
from tests import reference
from tests.conftest import run_surgery

_MOVES = {"transpose", "permute", torch.transpose, torch.permute}


class HFAttention(nn.Module):
    """The shape of transformers' BERT/ViT/Whisper self-attention (sdpa implementation), or GPT-2's fused q/k/v."""

    def __init__(self, c=8, heads=2, fused=False, causal=False):
        super().__init__()
        self.heads, self.fused, self.causal = heads, fused, causal
        if fused:
            self.qkv = nn.Linear(c, 3 * c)
        else:
            self.q, self.k, self.v = nn.Linear(c, c), nn.Linear(c, c), nn.Linear(c, c)
        self.o = nn.Linear(c, c)
        self.norm = nn.LayerNorm(c)

    def forward(self, x, mask=None):
        b, s, c = x.shape
        h = self.norm(x)
        q, k, v = self.qkv(h).split(c, dim=2) if self.fused else (self.q(h), self.k(h), self.v(h))
        q, k, v = (t.view(b, s, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=self.causal)
        return x + self.o(y.transpose(1, 2).reshape(b, s, c))


def _numpy_attention(x, model, mask=None, causal=False):
    w = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    b, s, c = x.shape
    hn = reference.layer_norm(x, -1, w["norm.weight"], w["norm.bias"], model.norm.eps)
    if model.fused:
        q, k, v = np.split(reference.linear(hn, w["qkv.weight"], w["qkv.bias"]), 3, axis=-1)
    else:
        q, k, v = (reference.linear(hn, w[f"{n}.weight"], w[f"{n}.bias"]) for n in "qkv")
    q, k, v = (t.reshape(b, s, model.heads, -1).transpose(0, 2, 1, 3) for t in (q, k, v))
    scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(q.shape[-1])
    if causal:
        scores = np.where(np.tril(np.ones((s, s), bool)), scores, -np.inf)
    if mask is not None:
        scores = np.where(mask, scores, -np.inf) if mask.dtype == bool else scores + mask
    y = (reference.softmax(scores) @ v).transpose(0, 2, 1, 3).reshape(b, s, c)
    return x + reference.linear(y, w["o.weight"], w["o.bias"])


def _moves_in_attention(gm):
    """Transposes and permutes left in the rewritten graph, and the per-head attention calls."""
    nodes = [n for n in gm.graph.nodes if n.op in ("call_function", "call_method")]
    return sum(n.target in _MOVES for n in nodes), sum(n.target is _runtime.attention_channels for n in nodes)


@pytest.mark.parametrize("quantize", [None, "int8"])  # int8: SDPA itself on permuted views (quantizers keep it)
@pytest.mark.parametrize("fused", [False, True], ids=["q-k-v", "fused-qkv"])
@pytest.mark.parametrize("mask", [None, "bool", "float", "causal"])
def test_carried_without_transposes_and_equal_to_numpy(fused, mask, quantize):
    torch.manual_seed(0)
    model = HFAttention(fused=fused, causal=mask == "causal").eval().double()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    m = None
    if mask == "bool":
        m = torch.ones(2, 1, 5, 5, dtype=torch.bool)
        m[0, :, :, 3:] = False  # a padded sequence
    elif mask == "float":
        m = torch.randn(2, 1, 1, 5, dtype=torch.float64)
    args = (x,) if m is None else (x, m)
    names = ["qkv", "o"] if fused else ["q", "k", "v", "o"]
    res = run_surgery("linear_to_conv", model, args, rewritten=names, token_layout=True, quantize=quantize)
    assert _moves_in_attention(res.module) == (2, 1)  # the tokens enter (B, C, 1, S) once and leave once
    expected = _numpy_attention(x.numpy(), model, None if m is None else m.numpy(), causal=mask == "causal")
    with torch.no_grad():
        np.testing.assert_allclose(res.module(*args).numpy(), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("sdpa", [False, True])
@pytest.mark.parametrize("kind", ["bool", "-inf", "finfo.min"])
def test_a_query_row_with_every_key_masked_gives_what_sdpa_gives(kind, sdpa):
    """A boolean False row, or a float row of -inf: zeros (SDPA's safe softmax); a float row of the lowest finite
    value (transformers' padding masks): a uniform row, as SDPA's. The boolean mask fills with that lowest value, not
    -inf (a quantizer calibrates on it), and the row is still found by the keys kept."""
    q, k, v = (torch.randn(1, 2, 4, 3, dtype=torch.float64) for _ in range(3))  # (B, H, D, S)
    if kind == "bool":
        mask = torch.ones(1, 1, 3, 3, dtype=torch.bool)
        mask[0, 0, 1] = False
    else:
        mask = torch.zeros(1, 1, 3, 3, dtype=torch.float64)
        mask[0, 0, 1] = float("-inf") if kind == "-inf" else torch.finfo(torch.float64).min
    got = _runtime.attention_channels(q, k, v, mask, False, None, sdpa=sdpa)
    expected = F.scaled_dot_product_attention(*(t.transpose(-1, -2) for t in (q, k, v)), attn_mask=mask)
    torch.testing.assert_close(got, expected.transpose(-1, -2), rtol=0, atol=1e-12)
    assert torch.equal(got[..., 1], torch.zeros(1, 2, 4, dtype=torch.float64)) == (kind != "finfo.min")


class EagerAttention(HFAttention):
    """transformers' "eager" attention: the products and the softmax written out."""

    def forward(self, x, mask):
        b, s, c = x.shape
        h = self.norm(x)
        q, k, v = (t.view(b, s, self.heads, -1).transpose(1, 2) for t in (self.q(h), self.k(h), self.v(h)))
        scores = torch.matmul(q, k.transpose(2, 3)) * (c // self.heads) ** -0.5 + mask  # (HF: self.scaling)
        y = torch.matmul(torch.softmax(scores, dim=-1), v)
        return x + self.o(y.transpose(1, 2).contiguous().reshape(b, s, c))


@pytest.mark.parametrize("quantize", [None, "int8"])  # int8: MatMuls of permuted operands, not Einsums
def test_eager_attention_is_carried_too(quantize):
    torch.manual_seed(0)
    model = EagerAttention().eval().double()
    x, mask = torch.randn(2, 5, 8, dtype=torch.float64), torch.randn(2, 1, 1, 5, dtype=torch.float64)
    res = run_surgery(
        "linear_to_conv", model, (x, mask), rewritten=["q", "k", "v", "o"], token_layout=True, quantize=quantize
    )
    nodes = [n for n in res.module.graph.nodes if n.op in ("call_function", "call_method")]
    products = torch.matmul if quantize else torch.einsum
    assert sum(n.target in _MOVES for n in nodes) == 2 and sum(n.target is products for n in nodes) == 2
    with torch.no_grad():
        np.testing.assert_allclose(res.module(x, mask).numpy(), _numpy_attention(x.numpy(), model, mask.numpy()),
                                   rtol=0, atol=1e-12)  # fmt: skip


class CrossAttention(HFAttention):
    """A decoder's cross-attention: queries from the tokens, keys and values from another sequence (the encoder's)."""

    def forward(self, x, memory):
        (b, s, c), t = x.shape, memory.shape[1]
        q = self.q(self.norm(x)).view(b, s, self.heads, -1).transpose(1, 2)
        m = self.norm(memory)
        k, v = (f(m).view(b, t, self.heads, -1).transpose(1, 2) for f in (self.k, self.v))
        return x + self.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, s, c))


def test_cross_attention_over_another_length_is_carried():
    torch.manual_seed(0)
    model = CrossAttention().eval().double()
    x, memory = torch.randn(2, 5, 8, dtype=torch.float64), torch.randn(2, 7, 8, dtype=torch.float64)
    res = run_surgery("linear_to_conv", model, (x, memory), rewritten=["q", "k", "v", "o"], token_layout=True)
    assert _moves_in_attention(res.module) == (3, 1)  # both sequences enter once, the result leaves once


class Rotary(HFAttention):
    """An elementwise product with a broadcast table (as rotary embeddings): the table enters the heads layout, the
    queries stay in it."""

    def forward(self, x):
        b, s, c = x.shape
        q, k, v = (t.view(b, s, self.heads, -1).transpose(1, 2) for t in (self.q(x), self.k(x), self.v(x)))
        table = torch.arange(s, dtype=x.dtype).view(1, 1, s, 1)
        y = F.scaled_dot_product_attention(q * table, k, v)
        return self.o(y.transpose(1, 2).reshape(b, s, c))


def test_a_broadcast_table_enters_the_heads_layout_and_the_queries_stay_in_it():
    model = Rotary().eval().double()
    res = run_surgery("linear_to_conv", model, torch.randn(2, 5, 8, dtype=torch.float64), rewritten=["q", "k", "v", "o"],
                      token_layout=True)  # fmt: skip
    moves, attention = _moves_in_attention(res.module)
    assert attention == 1 and moves == 3  # the tokens in and out, and the table (1, 1, S, 1) read as (1, 1, 1, S)


def test_without_the_token_layout_attention_is_left_alone():
    res = run_surgery("linear_to_conv", HFAttention().eval(), torch.randn(2, 5, 8), rewritten=[])
    assert _moves_in_attention(res.module)[1] == 0
