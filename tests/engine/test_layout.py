"""Layouts: every layout's enter/exit round trip is the identity, and the carried value has the promised shape."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx

from fxsurgery.capture import propagate_shapes
from fxsurgery.engine.layout import composes_to_identity, permutation_layout, permute_dims
from fxsurgery.rules.conv_to_linear.layouts import CHANNELS_LAST, FLAT_LAYOUT
from fxsurgery.rules.linear_to_conv.layouts import NCHW_LAYOUT, POINT_LAYOUT, SPATIAL_LAYOUT, TOKEN_LAYOUT

# (layout, original shape, the shape it is carried as)
CASES = {
    "point (N,C)->(N,C,1,1)": (POINT_LAYOUT, (3, 5), (3, 5, 1, 1)),
    "spatial (N,C)->(1,C,1,N)": (SPATIAL_LAYOUT, (3, 5), (1, 5, 1, 3)),
    "NHWC->NCHW": (NCHW_LAYOUT, (2, 4, 3, 5), (2, 5, 4, 3)),
    "tokens (B,S,C)->(B,C,1,S)": (TOKEN_LAYOUT, (2, 7, 6), (2, 6, 1, 7)),
    "NCHW->NHWC": (CHANNELS_LAST[4], (2, 5, 4, 3), (2, 4, 3, 5)),
    "NCL->NLC": (CHANNELS_LAST[3], (2, 5, 4), (2, 4, 5)),
    "(N,C,1,1)->(N,C)": (FLAT_LAYOUT, (3, 5, 1, 1), (3, 5)),
}


def _round_trip(layout, shape):
    """A graph x -> enter -> exit, with the carried value as a second output."""
    graph = fx.Graph()
    x = graph.placeholder("x")
    out = graph.output((x,))
    gm = fx.GraphModule(torch.nn.Module(), graph)
    propagate_shapes(gm, (torch.randn(shape),))  # layouts read static shapes from node.meta
    with graph.inserting_before(out):
        alt = layout.enter(graph, x, "site")
        back = layout.exit(graph, alt, x)
    out.args = ((back, alt),)
    graph.lint()
    gm.recompile()
    return gm


@pytest.mark.parametrize("case", sorted(CASES))
def test_enter_then_exit_is_the_identity(case):
    layout, shape, carried = CASES[case]
    gm = _round_trip(layout, shape)
    x = torch.randn(shape, dtype=torch.float64)
    back, alt = gm(x)
    assert tuple(alt.shape) == carried
    assert torch.equal(back, x)
    # the carried value holds the same numbers, only arranged differently
    assert torch.equal(alt.flatten().sort().values, x.flatten().sort().values)


def test_permutation_layout_knows_its_permutation():
    layout = permutation_layout("x", (0, 2, 3, 1))
    assert layout.to_alt == (0, 2, 3, 1)
    assert NCHW_LAYOUT.to_alt == (0, 3, 1, 2) and TOKEN_LAYOUT.to_alt is None


def test_permute_dims_reads_every_spelling():
    class M(torch.nn.Module):
        def forward(self, x):
            return x.permute(0, 2, 3, 1), x.permute((0, 3, 1, 2)), torch.permute(x, (0, -1, 1, 2)), x.transpose(1, 2)

    gm = fx.symbolic_trace(M())
    found = [permute_dims(n) for n in gm.graph.nodes if n.op in ("call_method", "call_function")]
    assert found == [(0, 2, 3, 1), (0, 3, 1, 2), (0, 3, 1, 2), None]


def test_composes_to_identity():
    assert composes_to_identity((0, 2, 3, 1), (0, 3, 1, 2))
    assert not composes_to_identity((0, 2, 3, 1), (0, 2, 3, 1))
    assert not composes_to_identity((0, 1), (0, 1, 2))
    x = torch.randn(2, 3, 4, 5)
    assert torch.equal(x.permute(0, 2, 3, 1).permute(0, 3, 1, 2), x)  # what the first assertion claims
