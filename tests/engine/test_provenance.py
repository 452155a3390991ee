"""Every node a rewrite adds carries the ``nn_module_stack`` and ``stack_trace`` of the node it replaces, and names
it (``fxsurgery_replaces``): checked against the graph the same front end captures with every site left alone."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxsurgery
from fxsurgery.engine.provenance import KEYS, REPLACES
from fxsurgery.models import demo_model
from fxsurgery.rules import DIRECTIONS


class _Encoder(nn.Module):
    """A pre-norm transformer block on tokens: the token layout's sites, and the layouts' enter/exit nodes."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, 2, batch_first=True)
        self.fc1, self.fc2 = nn.Linear(dim, 32), nn.Linear(32, dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        x = x + self.fc2(torch.relu(self.fc1(self.norm(x))))
        return self.head(x.mean(1))


CASES = {
    "demo conv": (demo_model, (2, 3, 32, 32), "conv", {}),
    "demo linear": (demo_model, (2, 3, 32, 32), "linear", {}),
    "encoder tokens": (_Encoder, (2, 5, 16), "conv", {"token_layout": True}),
}


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_every_added_node_carries_the_metadata_of_the_node_it_replaces(case, frontend):
    make, shape, to, extra = CASES[case]
    torch.manual_seed(0)
    model, x = make().eval(), torch.randn(shape)
    res = fxsurgery.rewrite(model, x, to, frontend=frontend, validate=False, **extra)
    assert res.rewritten, "the case must rewrite something"
    # the same front end with a rule set that does nothing: the graph as captured
    nothing = fxsurgery.RuleSet(DIRECTIONS[to], ())
    captured = fxsurgery.rewrite(model, x, to, frontend=frontend, validate=False, rules=nothing).module
    before = {n.name: n for n in captured.graph.nodes}
    added = [n for n in res.module.graph.nodes if n.name not in before]
    assert added
    for node in added:
        assert REPLACES in node.meta, f"{node.name} ({node.format_node()}) carries no provenance"
        origin = before.get(node.meta[REPLACES])
        assert origin is not None, f"{node.name} names {node.meta[REPLACES]!r}, not a node of the captured graph"
        for key in KEYS:
            assert node.meta.get(key) == origin.meta.get(key), f"{node.name}: {key} differs from {origin.name}'s"
    if frontend == "export":  # torch.export records both on every op: so must every node the rewrite adds
        assert all(all(k in n.meta for k in KEYS) for n in added if n.op != "get_attr")
