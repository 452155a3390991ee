"""moe-experts: fused mixture-of-experts weights computed densely as a 1x1 conv and a grouped 1x1 conv over every
token, each expert's output weighted by its routing weight (zero where not picked): the routed sum, exactly."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxsurgery
from fxsurgery.report import Site
from fxsurgery.rules.linear_to_conv.experts import PATTERN, DenseExperts, for_group
from tests import reference


def _routing(tokens: int, experts: int, k: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    index = torch.rand(tokens, experts, generator=gen).topk(k, dim=-1).indices
    return index, torch.rand(tokens, k, dtype=torch.float64, generator=gen)


@pytest.mark.parametrize("layout", ["spatial", "batch"])
def test_the_dense_form_equals_the_numpy_routed_experts(layout):
    e, c, i, t = 5, 6, 3, 7
    gen = torch.Generator().manual_seed(1)
    gate_up = nn.Parameter(torch.randn(e, 2 * i, c, dtype=torch.float64, generator=gen))
    down = nn.Parameter(torch.randn(e, c, i, dtype=torch.float64, generator=gen))
    x = torch.randn(t, c, dtype=torch.float64, generator=gen)
    index, weights = _routing(t, e, 2)
    with torch.no_grad():
        got = DenseExperts(gate_up, down, F.silu, layout)(x, index, weights)
    want = reference.routed_experts(x.numpy(), index.numpy(), weights.numpy(), gate_up.detach().numpy(),
                                    down.detach().numpy())  # fmt: skip
    assert got.shape == (t, c)
    assert abs(got.numpy() - want).max() < 1e-12 * abs(want).max()


class ToyExperts(nn.Module):
    """A fused-experts layer of the user's own, routed token by token."""

    def __init__(self, experts=4, channels=8, inner=4, act=torch.relu):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.randn(experts, 2 * inner, channels) / 3)
        self.down_proj = nn.Parameter(torch.randn(experts, channels, inner) / 3)
        self.act_fn, self.inner = act, inner

    def forward(self, x, index, weights):
        out = torch.zeros_like(x)
        for t in range(x.shape[0]):
            for e, w in zip(index[t].tolist(), weights[t]):
                gate, up = (self.gate_up_proj[e] @ x[t]).split(self.inner)
                out[t] += w * (self.down_proj[e] @ (self.act_fn(gate) * up))
        return out


class NotGatedExperts(ToyExperts):
    """The activation on the sum of gate and up: not the dense form's act(gate) * up."""

    def forward(self, x, index, weights):
        out = torch.zeros_like(x)
        for t in range(x.shape[0]):
            for e, w in zip(index[t].tolist(), weights[t]):
                gate, up = (self.gate_up_proj[e] @ x[t]).split(self.inner)
                out[t] += w * (self.down_proj[e] @ self.act_fn(gate + up))
        return out


class Block(nn.Module):
    """Tokens (B, S, C) -> norm -> a top-2 router -> the experts on the rows -> residual."""

    def __init__(self, experts: nn.Module, channels=8):
        super().__init__()
        self.norm, self.router, self.experts = nn.LayerNorm(channels), nn.Linear(channels, 4), experts

    def forward(self, x):
        b, s, c = x.shape
        rows = self.norm(x).reshape(-1, c)
        top = self.router(rows).softmax(-1).topk(2, dim=-1)
        return x + self.experts(rows, top.indices, top.values).reshape(b, s, c)


def test_a_users_fused_experts_are_rewritten_exactly_and_their_weights_stay_theirs():
    torch.manual_seed(0)
    model = Block(ToyExperts()).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 5, 8)
    res = fxsurgery.linear_to_conv(model, x, token_layout=True, precision="float64")
    site = {s.name: s for s in res.sites}["experts"]
    assert site.pattern == PATTERN and site.rewritten, res.summary()
    assert res.validation.passed and res.validation.max_rel_error < 1e-12
    torch.testing.assert_close(res.module(x), model(x), rtol=1e-5, atol=1e-6)
    assert isinstance(model.experts, ToyExperts)  # the user's layer stays, and the rewrite reads its storage
    assert res.module.get_parameter("experts.gate_up_proj").data_ptr() == model.experts.gate_up_proj.data_ptr()
    assert fxsurgery.original_state_dict(res.module).keys() == model.state_dict().keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_experts_that_are_not_the_dense_form_are_listed_with_why_and_left_routed():
    torch.manual_seed(0)
    model = Block(NotGatedExperts()).eval()
    res = fxsurgery.linear_to_conv(model, torch.randn(2, 5, 8), token_layout=True)
    site = {s.name: s for s in res.sites}["experts"]
    assert not site.rewritten and "does not compute the dense form" in site.reason, res.summary()
    assert res.validation.passed
    assert any(isinstance(m, NotGatedExperts) for m in res.module.modules())  # called as it was


@pytest.mark.parametrize(
    ("options", "why"),
    [({"exclude": ["experts"]}, "excluded by the caller"), ({}, "token_layout=True")],
)
def test_experts_stay_routed_when_excluded_or_outside_the_token_layout(options, why):
    torch.manual_seed(0)
    model = Block(ToyExperts()).eval()
    res = fxsurgery.linear_to_conv(model, torch.randn(2, 5, 8), token_layout="exclude" in options, **options)
    site = {s.name: s for s in res.sites}["experts"]
    assert not site.rewritten and why in site.reason
    assert res.validation.passed
    assert any(isinstance(m, ToyExperts) for m in res.module.modules())  # called as it was


def test_the_culprit_search_captures_again_when_it_leaves_an_experts_site_out():
    model, options = Block(ToyExperts()).eval(), fxsurgery.Options(token_layout=True)
    sites = [Site("experts", PATTERN, "rewritten"), Site("norm", "token-linear", "rewritten")]
    kept, again = for_group(model, sites, options, ["norm"], {})
    assert isinstance(kept.get_submodule("experts"), DenseExperts) and not again
    left, again = for_group(model, sites, options, ["experts"], {})
    assert isinstance(left.get_submodule("experts"), ToyExperts) and again
    assert for_group(model, sites[1:], options, ["experts"], {}) == (model, False)  # no experts rewritten: as it is


def test_the_batch_layout_reads_the_rows_without_a_transpose():
    torch.manual_seed(0)
    model, x = Block(ToyExperts()).eval(), torch.randn(2, 5, 8)
    res = {
        layout: fxsurgery.linear_to_conv(model, x, token_layout=True, batch_layout=layout, precision="float64")
        for layout in ("spatial", "batch")
    }
    for layout, r in res.items():
        site = {s.name: s for s in r.sites}["experts"]
        assert site.rewritten and site.after.endswith("(T,C,1,1)" if layout == "batch" else "(1,C,1,T)")
        assert r.validation.passed and r.validation.max_rel_error < 1e-12
    moves = {k: sum(n.target in ("t", "transpose", "permute") for n in r.module.graph.nodes) for k, r in res.items()}
    assert moves["spatial"] - moves["batch"] == 3, moves  # the rows in, the routing, the sum out: none of them
