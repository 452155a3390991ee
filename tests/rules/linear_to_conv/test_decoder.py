"""Decoder blocks in the token layout (token_layout=True): RMSNorm over channels, rotary embeddings and grouped-query
heads carried on (B, C, 1, S) tokens and (B, H, D, S) heads, against a NumPy float64 reference of a Llama block."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from fxsurgery import _runtime
from tests import reference
from tests.conftest import run_surgery

_MOVES = {"transpose", "permute", torch.transpose, torch.permute}
_LINEARS = ["q", "k", "v", "o", "gate", "up", "down"]


class LlamaBlock(nn.Module):
    """transformers' Llama decoder layer written out: RMSNorm (an upcast, the mean square over the channels, the
    weight), q/k/v projections, rotary embeddings (rotate-half), grouped-query heads repeated by
    ``expand``/``reshape``, causal SDPA, the output projection, SwiGLU MLP, residuals."""

    def __init__(self, c=16, heads=4, kv_heads=2, mlp=24):
        super().__init__()
        self.heads, self.kv_heads, self.d = heads, kv_heads, c // heads
        self.q, self.o = nn.Linear(c, c, bias=False), nn.Linear(c, c, bias=False)
        self.k, self.v = nn.Linear(c, kv_heads * self.d, bias=False), nn.Linear(c, kv_heads * self.d, bias=False)
        self.gate, self.up = nn.Linear(c, mlp, bias=False), nn.Linear(c, mlp, bias=False)
        self.down = nn.Linear(mlp, c, bias=False)
        self.norm1, self.norm2 = nn.Parameter(torch.rand(c) + 0.5), nn.Parameter(torch.rand(c) + 0.5)
        self.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(0, self.d, 2).double() / self.d))

    def rms(self, x, w):
        h = x.to(torch.float64)  # HF: .to(torch.float32), then back to the input's dtype
        return w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6))

    def rotate(self, t, cos, sin):
        half = self.d // 2
        return t * cos + torch.cat((-t[..., half:], t[..., :half]), dim=-1) * sin

    def repeat(self, t):
        b, kv, s, d = t.shape
        n = self.heads // self.kv_heads
        return t[:, :, None, :, :].expand(b, kv, n, s, d).reshape(b, kv * n, s, d)

    def forward(self, x):
        b, s, c = x.shape
        freqs = torch.arange(s, dtype=self.inv_freq.dtype)[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos()[None, None], emb.sin()[None, None]
        h = self.rms(x, self.norm1)
        q, k, v = (t.view(b, s, -1, self.d).transpose(1, 2) for t in (self.q(h), self.k(h), self.v(h)))
        q, k = self.rotate(q, cos, sin), self.rotate(k, cos, sin)
        y = F.scaled_dot_product_attention(q, self.repeat(k), self.repeat(v), is_causal=True)
        x = x + self.o(y.transpose(1, 2).reshape(b, s, c))
        h = self.rms(x, self.norm2)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


def _numpy_block(x, model):
    w = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    b, s, c = x.shape
    d, n = model.d, model.heads // model.kv_heads

    def rms(t, weight):
        return weight * t / np.sqrt((t**2).mean(-1, keepdims=True) + 1e-6)

    def heads(t):
        return t.reshape(b, s, -1, d).transpose(0, 2, 1, 3)

    freqs = np.arange(s)[:, None] * w["inv_freq"][None, :]
    cos, sin = np.cos(np.concatenate([freqs, freqs], -1)), np.sin(np.concatenate([freqs, freqs], -1))
    rotate = lambda t: t * cos + np.concatenate([-t[..., d // 2:], t[..., : d // 2]], -1) * sin  # noqa: E731
    h = rms(x, w["norm1"])
    q, k, v = (heads(reference.linear(h, w[f"{p}.weight"], None)) for p in "qkv")
    q, k, v = rotate(q), np.repeat(rotate(k), n, axis=1), np.repeat(v, n, axis=1)
    scores = np.where(np.tril(np.ones((s, s), bool)), q @ k.transpose(0, 1, 3, 2) / np.sqrt(d), -np.inf)
    y = (reference.softmax(scores) @ v).transpose(0, 2, 1, 3).reshape(b, s, c)
    x = x + reference.linear(y, w["o.weight"], None)
    h = rms(x, w["norm2"])
    gate = reference.linear(h, w["gate.weight"], None)
    mlp = gate / (1 + np.exp(-gate)) * reference.linear(h, w["up.weight"], None)
    return x + reference.linear(mlp, w["down.weight"], None)


def _moves(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op in ("call_function", "call_method") and n.target in _MOVES]


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_a_llama_block_runs_in_the_token_layout_and_equals_numpy(frontend):
    torch.manual_seed(0)
    model = LlamaBlock().eval().double()
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    res = run_surgery("linear_to_conv", model, x, rewritten=_LINEARS, token_layout=True, frontend=frontend)
    with torch.no_grad():
        np.testing.assert_allclose(res.module(x).numpy(), _numpy_block(x.numpy(), model), rtol=0, atol=1e-12)
    moves = _moves(res.module)
    # the tokens enter (B, C, 1, S) once and leave once; the cos/sin tables (1, 1, S, D) are read as (1, 1, D, S)
    read = [n.args[0].meta.get("val") for n in moves]
    tables = [v for v in read if isinstance(v, torch.Tensor) and tuple(v.shape[:2]) == (1, 1)]
    assert len(moves) == 2 + len(tables) and len(tables) <= 2, [(n.name, n.args[0].name) for n in moves]
    nodes = list(res.module.graph.nodes)
    assert sum(n.target is _runtime.attention_channels for n in nodes) == 1
    assert not any(n.target is F.scaled_dot_product_attention for n in nodes)


def test_rms_norm_is_reduced_over_the_channels_of_the_carried_tokens():
    torch.manual_seed(0)
    model = LlamaBlock().eval().double()
    res = run_surgery("linear_to_conv", model, torch.randn(2, 6, 16, dtype=torch.float64), rewritten=_LINEARS,
                      token_layout=True)  # fmt: skip
    means = [n for n in res.module.graph.nodes if n.target in (torch.mean, "mean")]
    assert len(means) == 2 and all(list(n.args[1]) == [1] for n in means)  # dim 1 of (B, C, 1, S), twice


class Uncarried(LlamaBlock):
    """A step on the heads that no propagator carries (a flip of head_dim): converted back there, still exact."""

    def forward(self, x):
        b, s, c = x.shape
        q, k, v = (t.view(b, s, -1, self.d).transpose(1, 2) for t in (self.q(x), self.k(x), self.v(x)))
        y = F.scaled_dot_product_attention(q.flip(-1), self.repeat(k).flip(-1), self.repeat(v))
        return self.o(y.transpose(1, 2).reshape(b, s, c))


def test_a_step_it_cannot_carry_converts_back_there_and_stays_exact():
    res = run_surgery("linear_to_conv", Uncarried().eval().double(), torch.randn(2, 5, 16, dtype=torch.float64),
                      rewritten=["q", "k", "v", "o"], token_layout=True)  # fmt: skip
    assert sum(n.target is _runtime.attention_channels for n in res.module.graph.nodes) == 1


def test_keys_and_values_in_sdpa_layout_are_read_as_they_are():
    q = torch.randn(1, 2, 4, 3, dtype=torch.float64)  # (B, H, D, S)
    k, v = torch.randn(1, 2, 5, 4, dtype=torch.float64), torch.randn(1, 2, 5, 4, dtype=torch.float64)  # (B, H, T, D)
    got = _runtime.attention_channels(q, k, v, None, False, None, "bhtd", "bhtd")
    expected = F.scaled_dot_product_attention(q.transpose(-1, -2), k, v)
    torch.testing.assert_close(got, expected.transpose(-1, -2), rtol=0, atol=1e-12)


class TableFromInput(nn.Module):
    """A product of the tokens with a lower-rank table computed from the input (its sequence length varies)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x):
        return self.fc2(self.fc1(x) * x[0].tanh())  # (B, S, C) * (S, C)


def test_a_lower_rank_table_is_entered_without_fixing_its_sizes():
    model = TableFromInput().eval().double()
    res = run_surgery("linear_to_conv", model, torch.randn(2, 5, 8, dtype=torch.float64), rewritten=["fc1", "fc2"],
                      token_layout=True, frontend="fx")  # fmt: skip
    x = torch.randn(3, 7, 8, dtype=torch.float64)  # another batch and sequence length than the example's
    with torch.no_grad():
        torch.testing.assert_close(res.module(x), model(x), rtol=0, atol=1e-12)
