"""Each site's picture is the real local subgraph: before, the nodes of the original graph around it (those the pass
removed marked so); after, the nodes of the rewritten graph around what replaced it. Checked against the graphs
themselves: every node of a picture exists in its graph with its edges, and the roles agree with the node sets."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.fx as fx
from torch import nn

import fxsurgery
from fxsurgery.engine import subgraph


class Head(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.pw = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x):
        x = torch.relu(self.conv(x))
        x = self.pw(x)
        return self.fc(torch.flatten(x, 1))


def _graph_edges(gm: fx.GraphModule) -> set[tuple[str, str]]:
    return {(i.name, n.name) for n in gm.graph.nodes for i in n.all_input_nodes}


def _check_picture(picture, gm: fx.GraphModule, new_names: set[str] | None):
    """Every node is a node of ``gm``; every edge an edge of it; roles: new = not in the original graph."""
    names = {n.name for n in gm.graph.nodes}
    ids = [n["id"] for n in picture["nodes"]]
    assert set(ids) <= names and len(ids) == len(set(ids)) and len(ids) <= subgraph.MAX_NODES
    assert {tuple(e) for e in picture["edges"]} <= _graph_edges(gm)
    assert sum(n["site"] for n in picture["nodes"]) == 1
    if new_names is not None:
        for n in picture["nodes"]:
            assert (n["role"] == "new") == (n["id"] in new_names), n


@pytest.mark.parametrize("to", ["conv", "linear"])
def test_pictures_are_the_graphs_around_each_site(to):
    model, x = Head().eval(), torch.randn(2, 3, 4, 4)
    original = fx.symbolic_trace(copy.deepcopy(model))
    res = fxsurgery.linear_to_conv(model, x) if to == "conv" else fxsurgery.conv_to_linear(model, x)
    after_gm = res.module
    kept_names = {n.name for n in after_gm.graph.nodes}
    site = {"conv": "fc", "linear": "pw"}[to]
    pictures = next(s.subgraph for s in res.sites if s.name == site)
    before = pictures["before"]
    _check_picture(before, original, None)
    for n in before["nodes"]:  # removed exactly when the rewritten graph no longer has it
        assert (n["role"] == "removed") == (n["id"] not in kept_names), n
    _check_picture(pictures["after"], after_gm, kept_names - {n.name for n in original.graph.nodes})
    site_before = next(n for n in before["nodes"] if n["site"])
    site_after = next(n for n in pictures["after"]["nodes"] if n["site"])
    if to == "conv":
        assert site_before["label"] == "fc: Linear 128->5" and site_before["shape"] == "2x5"
        assert site_after["label"].startswith("fc: Conv2d 8->5 4x4")  # stride 4x4 in the side-by-side batch layout
        assert any(n["label"] == "flatten(1)" and n["role"] == "removed" for n in before["nodes"])
    else:
        assert site_before["label"] == "pw: Conv2d 8->8 1x1" and site_before["shape"] == "2x8x4x4"
        assert site_after["label"] == "pw: Linear 8->8"
        assert any(n["label"].startswith(".permute(") and n["role"] == "new" for n in pictures["after"]["nodes"])


def test_a_skipped_site_has_its_neighbourhood_and_no_after():
    model, x = Head().eval(), torch.randn(2, 3, 4, 4)
    res = fxsurgery.linear_to_conv(model, x, exclude=["fc"])
    (site,) = res.sites
    assert site.status == "skipped" and site.subgraph["after"] is None
    assert {n["role"] for n in site.subgraph["before"]["nodes"]} == {"kept"}


def test_auto_keeping_the_original_leaves_nothing_removed():
    pictures = {"before": {"nodes": [{"id": "fc", "label": "fc", "shape": None, "role": "removed", "site": True}],
                           "edges": []}, "after": {"nodes": [], "edges": []}}  # fmt: skip
    alone = subgraph.left_alone(pictures)
    assert alone["after"] is None and alone["before"]["nodes"][0]["role"] == "kept"
    assert pictures["before"]["nodes"][0]["role"] == "removed"  # not modified
