"""Reshapes, pads, rolls and constants of values carried in the token layout (``token_layout=True``): a Swin-style
window block on a channels-last map and an interleaved rotary embedding run on the carried values, with fewer moves
than the original; a constant is entered into the layout once when nothing can change it, and read in the graph when
loading a state dict can. Every rewrite is checked against the original model in float64 (``run_surgery``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import fxsurgery
from tests.conftest import moves, run_surgery


class Windows(nn.Module):
    """timm's Swin block in miniature: a conv stem permuted to channels-last, a LayerNorm, a cyclic shift, padding to
    a multiple of the window, window partition, Linears on each window's tokens, window reverse, the padding cut off,
    the shift undone, a residual add and a channels-last mean."""

    def __init__(self, c=8, window=2, shift=1):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 1)
        self.norm = nn.LayerNorm(c)
        self.qkv, self.proj = nn.Linear(c, 2 * c), nn.Linear(2 * c, c)
        self.window, self.shift = window, shift

    def forward(self, img):
        x = self.stem(img).permute(0, 2, 3, 1)
        b, h, w, c = x.shape
        n, s = self.window, self.shift
        y = F.pad(torch.roll(self.norm(x), (-s, -s), (1, 2)), (0, 0, 0, (n - w % n) % n, 0, (n - h % n) % n))
        _, hp, wp, _ = y.shape
        y = y.view(b, hp // n, n, wp // n, n, c).permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, n * n, c)
        y = self.proj(self.qkv(y))
        y = y.view(-1, hp // n, wp // n, n, n, c).permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, c)
        y = torch.roll(y[:, :h, :w, :].contiguous(), (s, s), (1, 2))
        return (x + y).mean((1, 2))


def test_a_window_block_runs_on_the_carried_map_with_fewer_moves_than_the_original():
    model = Windows().eval()
    res = run_surgery("linear_to_conv", model, torch.randn(2, 3, 5, 5), rewritten=["qkv", "proj"], token_layout=True)
    # the original: the stem's permute and the two of the windows; rewritten: the windows' two (NCHW <-> windows)
    assert moves(res.module) == 2 < moves(torch.fx.symbolic_trace(model)) == 3, res.module.code
    assert not any(n.target is torch.roll and n.args[2] != [2, 3] for n in res.module.graph.nodes)  # rolls H, W


class Interleaved(nn.Module):
    """timm's EVA rotary embedding: ``x * cos + rot(x) * sin`` with ``rot`` interleaving ``(-x1, x0, -x3, x2, ...)``
    through ``stack`` and ``reshape(x.shape)``, the class token cut off first and concatenated back, the rotation
    cast back to the input's dtype; the tables are a non-persistent buffer split by ``chunk``."""

    def __init__(self, c=8, heads=2, tokens=5):
        super().__init__()
        self.heads = heads
        self.qkv, self.out = nn.Linear(c, 3 * c), nn.Linear(c, c)
        angle = torch.randn(tokens - 1, c // heads)
        self.register_buffer("rope", torch.cat([angle.sin(), angle.cos()], -1), persistent=False)

    def rotate(self, x):
        sin, cos = self.rope.chunk(2, -1)
        rot = torch.stack([-x[..., 1::2], x[..., ::2]], -1).reshape(x.shape)
        return torch.cat([x[:, :, :1, :], (x[:, :, 1:, :] * cos + rot[:, :, 1:, :] * sin).to(dtype=x.dtype)], dim=2)

    def forward(self, x):
        b, s, c = x.shape
        q, k, v = self.qkv(x).reshape(b, s, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        y = F.scaled_dot_product_attention(self.rotate(q), self.rotate(k), v)
        return self.out(y.transpose(1, 2).reshape(b, s, c))


def test_an_interleaved_rotary_embedding_runs_per_head():
    model = Interleaved().eval()
    res = run_surgery("linear_to_conv", model, torch.randn(2, 5, 8), rewritten=["qkv", "out"], token_layout=True)
    assert moves(res.module) == 2, res.module.code  # the tokens in and out: the tables are entered once, here


def test_an_interleaved_rotary_embedding_runs_per_head_once_exported():
    """(torch.export writes ``x.dtype`` as the constant float32: the proof in float64 is the validation's, which
    exports a float64 copy; the rewritten float32 model is compared with the original here.)"""
    model, x = Interleaved().eval(), torch.randn(2, 5, 8)
    res = fxsurgery.linear_to_conv(model, x, token_layout=True, frontend="export", precision="float64")
    assert res.frontend == "export" and {s.name for s in res.rewritten} == {"qkv", "out"}, res.summary()
    assert res.validation.max_rel_error < 1e-12 and moves(res.module) == 2, res.module.code
    torch.testing.assert_close(res.module(x), model(x))


class Table(nn.Module):
    """Tokens times a ``(S, C)`` table between two Linears."""

    def __init__(self, persistent: bool):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 8), nn.Linear(8, 8)
        self.register_buffer("table", torch.randn(5, 8), persistent=persistent)

    def forward(self, x):
        return self.fc2(self.fc1(x) * self.table)


def test_a_table_loading_cannot_change_is_entered_once_and_follows_the_model_to_float64():
    model = Table(persistent=False).eval()
    x = torch.randn(2, 5, 8)
    res = run_surgery("linear_to_conv", model, x, rewritten=["fc1", "fc2"], token_layout=True, precision="native")
    assert moves(res.module) == 2  # the tokens in and out; the table is held as (1, C, 1, S)
    wide = res.module.double()  # a buffer of the rewritten model: converted with it
    torch.testing.assert_close(wide(x.double()), model.double()(x.double()), rtol=1e-12, atol=1e-12)


def test_a_table_in_the_state_dict_is_read_in_the_graph_so_that_loading_weights_changes_it():
    model = Table(persistent=True).eval()
    x = torch.randn(2, 5, 8)
    res = run_surgery("linear_to_conv", model, x, rewritten=["fc1", "fc2"], token_layout=True)
    trained = {"table": torch.randn(5, 8)}
    res.module.load_state_dict(trained, strict=False)
    model.load_state_dict(trained, strict=False)
    torch.testing.assert_close(res.module(x), model(x))


class Written(nn.Module):
    """A table the forward updates in place after reading it (torch.fx refuses the write; torch.export keeps it)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 8), nn.Linear(8, 8)
        self.register_buffer("table", torch.randn(5, 8), persistent=False)

    def forward(self, x):
        y = self.fc2(self.fc1(x) * self.table)
        self.table.mul_(0.5)
        return y


def test_a_table_the_forward_writes_is_read_where_it_is_written():
    model = Written().eval()
    x = torch.randn(2, 5, 8)
    res = run_surgery("linear_to_conv", model, x, rewritten=["fc1", "fc2"], token_layout=True, frontend="export")
    ref = Written().eval()
    ref.load_state_dict(model.state_dict())
    ref.table.copy_(res.module.get_buffer("table"))
    for _ in range(2):  # the second call reads the halved table in both
        torch.testing.assert_close(res.module(x), ref(x))


class BatchMean(nn.Module):
    """Tokens averaged over the batch (a reduction whose result is carried transposed) and over the sequence (one
    read in place), then added."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        y = self.fc(x)
        return y.mean(0) + y.sum(1, keepdim=False).mean(0, keepdim=True)


def test_reductions_that_drop_dims_of_carried_tokens_are_exact():
    model = BatchMean().eval()
    res = run_surgery("linear_to_conv", model, torch.randn(3, 5, 8), rewritten=["fc"], token_layout=True)
    # the tokens enter once; the reductions read the carried value (the one over the batch leaves (C, S) behind)
    assert sum(n.target == "transpose" for n in res.module.graph.nodes) == 1, res.module.code


class FunctionalQKV(nn.Module):
    """timm's EVA projection: ``F.linear`` on a Linear's weight with biases of its own (the layer is never called)."""

    def __init__(self, c=8):
        super().__init__()
        self.qkv, self.out = nn.Linear(c, 3 * c, bias=False), nn.Linear(3 * c, c)
        self.q_bias, self.v_bias = nn.Parameter(torch.randn(c)), nn.Parameter(torch.randn(c))

    def forward(self, x):
        bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias))
        return self.out(F.linear(x, weight=self.qkv.weight, bias=bias))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = FunctionalQKV()

    def forward(self, x):
        return self.attn(x)


def test_f_linear_on_a_layers_weight_is_that_layers_site_and_can_be_excluded_by_its_name():
    model, x = Block().eval(), torch.randn(2, 5, 8)
    res = run_surgery("linear_to_conv", model, x, rewritten=["attn.qkv", "attn.out"], token_layout=True)
    assert len(res.sites) == 2, res.summary()  # the layer is listed once, as the F.linear that computes it
    run_surgery("linear_to_conv", model, x, rewritten=["attn.out"], skipped={"attn.qkv": "excluded"},
                token_layout=True, exclude=["attn.qkv"])  # fmt: skip


class SinTable(nn.Module):
    """Tokens times a table computed from a non-persistent buffer by arithmetic (``sin``)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 8), nn.Linear(8, 8)
        self.register_buffer("angle", torch.randn(5, 8) * 3, persistent=False)

    def forward(self, x):
        return self.fc2(self.fc1(x) * self.angle.sin())


def test_a_table_computed_by_arithmetic_is_computed_in_the_graph_in_the_models_dtype():
    """Computed ahead in float32, a float64 copy of the rewritten model would hold float32-rounded values (torch.export
    keeps the ``sin`` in the graph; torch.fx computes it while tracing, a constant of the traced graph)."""
    model, x = SinTable().eval(), torch.randn(2, 5, 8)
    res = run_surgery("linear_to_conv", model, x, rewritten=["fc1", "fc2"], token_layout=True, precision="native",
                      frontend="export")  # fmt: skip
    wide = res.module.double()
    torch.testing.assert_close(wide(x.double()), model.double()(x.double()), rtol=1e-12, atol=1e-12)
