"""The local subgraph of a site before and after the pass, as data for the report's drawings.

Before a rule sees a site, the site's node and what lies near it in the original graph are recorded (its inputs up to
two steps back, its users one step on; parameters left out), with their labels and edges. When the pass has ended,
the recorded nodes the pass removed are marked ``removed``, the others ``kept``; and the *after* picture is read off
the rewritten graph around the site's counterpart (up to three steps back and two on, through the nodes the pass
added only, with the original nodes where they join it). Both are plain data, ``{"nodes": [{"id", "label",
"shape", "role", "site"}], "edges": [[from, to]]}``, drawn by :mod:`fxsurgery.artifacts.report_html`; a picture
holds at most :data:`MAX_NODES` nodes, nearest first.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from fxsurgery.capture.shapes import propagate_shapes
from fxsurgery.errors import one_line
from fxsurgery.report import Site

log = logging.getLogger(__name__)

__all__ = ["MAX_NODES", "Before", "label", "after", "attach", "left_alone", "with_shapes"]

MAX_NODES = 14
_MAX_LABEL = 44


def _op_name(target: Any) -> str:
    if isinstance(target, torch._ops.OpOverload):
        return f"aten.{target._overloadpacket.__name__}" if target.namespace == "aten" else str(target)
    return str(getattr(target, "__name__", target))


def _module_text(mod: nn.Module | None) -> str:
    if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.ConvTranspose2d)):
        stride = "" if set(mod.stride) == {1} else f" stride {'x'.join(map(str, mod.stride))}"
        return (
            f"{type(mod).__name__} {mod.in_channels}->{mod.out_channels} {'x'.join(map(str, mod.kernel_size))}{stride}"
        )
    if isinstance(mod, nn.Linear):
        return f"Linear {mod.in_features}->{mod.out_features}"
    return type(mod).__name__


def _index_text(index: Any) -> str | None:
    """``x[:, :, ::2, ::2]``'s index as written, or None when it is not made of slices and integers."""
    parts = index if isinstance(index, tuple) else (index,)
    out = []
    for p in parts:
        if isinstance(p, int):
            out.append(str(p))
        elif isinstance(p, slice) and all(v is None or isinstance(v, int) for v in (p.start, p.stop, p.step)):
            text = f"{'' if p.start is None else p.start}:{'' if p.stop is None else p.stop}"
            out.append(text + ("" if p.step is None else f":{p.step}"))
        else:
            return None
    return f"[{', '.join(out)}]"


def _args_text(node: fx.Node) -> str:
    """The literal arguments of a call (``.permute(0, 2, 3, 1)``, ``getitem[:, :, ::2, ::2]``), else nothing."""
    if node.target is operator.getitem and len(node.args) == 2:
        return _index_text(node.args[1]) or ""
    literal = [
        a
        for a in node.args[1:]
        if isinstance(a, int) or (isinstance(a, (tuple, list)) and a and all(isinstance(i, int) for i in a))
    ]
    if not literal or len(literal) != len(node.args) - 1:
        return ""
    return f"({', '.join(str(tuple(a)) if isinstance(a, (tuple, list)) else str(a) for a in literal)})"


def label(node: fx.Node, modules: Mapping[str, nn.Module]) -> str:
    """What ``node`` computes, short: ``self_attn.q_proj: Linear 512->512``, ``flatten(1)``,
    ``.permute(0, 2, 3, 1)``, ``input x``."""
    if node.op == "placeholder":
        text = f"input {node.name}"
    elif node.op == "output":
        text = "output"
    elif node.op == "call_module":
        short = ".".join(str(node.target).split(".")[-2:])  # the whole name is the site's, in the report's table
        text = f"{short}: {_module_text(modules.get(str(node.target)))}"
    elif node.op == "call_method":
        text = f".{node.target}{_args_text(node) or '()'}"
    else:
        text = _op_name(node.target) + _args_text(node)
    return text if len(text) <= _MAX_LABEL else text[: _MAX_LABEL - 1] + "…"


def _shape(node: fx.Node) -> str | None:
    """The value's shape where shape propagation recorded one (the original graph's nodes), e.g. ``2x64x4x4``."""
    meta = node.meta.get("val", node.meta.get("tensor_meta"))
    shape = getattr(meta, "shape", None)
    return None if shape is None or node.op == "output" else "x".join(str(d) for d in shape)


def _near(start: fx.Node, back: int, on: int, expand: Callable[[fx.Node], bool]) -> list[fx.Node]:
    """``start``, then its inputs up to ``back`` steps and its users up to ``on`` steps, nearest first; a node is
    passed through only where ``expand`` says so; parameters and constants (``get_attr``) are left out."""
    chosen = {start: None}
    for step, depth in ((lambda n: n.all_input_nodes, back), (lambda n: list(n.users), on)):
        frontier = [start]
        for _ in range(depth):
            nxt = []
            for n in frontier:
                if n is not start and not expand(n):
                    continue
                for m in step(n):
                    if m.op != "get_attr" and m not in chosen and len(chosen) < MAX_NODES:
                        chosen[m] = None
                        nxt.append(m)
            frontier = nxt
    return list(chosen)


def _picture(
    nodes: list[fx.Node],
    labels: Mapping[fx.Node, str],
    edges: Collection[tuple[fx.Node, fx.Node]],
    role: Callable[[fx.Node], str],
    site: fx.Node,
) -> dict[str, Any]:
    return {
        "nodes": [
            {"id": n.name, "label": labels[n], "shape": _shape(n), "role": role(n), "site": n is site} for n in nodes
        ],
        "edges": [[a.name, b.name] for a, b in edges],
    }


def _edges(nodes: list[fx.Node]) -> list[tuple[fx.Node, fx.Node]]:
    inside = set(nodes)
    return list(dict.fromkeys((i, n) for n in nodes for i in n.all_input_nodes if i in inside))


@dataclass
class Before:
    """The site's neighbourhood in the original graph, recorded before its rule runs (the pass removes nodes, and a
    removed node forgets its inputs)."""

    node: fx.Node
    nodes: list[fx.Node]
    labels: dict[fx.Node, str]
    edges: list[tuple[fx.Node, fx.Node]]

    @classmethod
    def record(cls, node: fx.Node, modules: Mapping[str, nn.Module]) -> Before:
        nodes = _near(node, back=2, on=1, expand=lambda n: True)
        return cls(node, nodes, {n: label(n, modules) for n in nodes}, _edges(nodes))

    def picture(self) -> dict[str, Any]:
        """After the pass: which of the recorded nodes it removed."""
        return _picture(self.nodes, self.labels, self.edges, lambda n: "removed" if n._erased else "kept", self.node)


def after(alt: fx.Node, original: Collection[fx.Node], modules: Mapping[str, nn.Module]) -> dict[str, Any]:
    """The rewritten graph around ``alt`` (the site's counterpart): the nodes the pass added, and the original nodes
    where they join them."""
    nodes = _near(alt, back=3, on=2, expand=lambda n: n not in original)
    labels = {n: label(n, modules) for n in nodes}
    return _picture(nodes, labels, _edges(nodes), lambda n: "kept" if n in original else "new", alt)


def attach(
    sites: list[Site],
    records: list[tuple[int, int, Before]],
    alt: Mapping[fx.Node, tuple[fx.Node, Any]],
    original: Collection[fx.Node],
    modules: Mapping[str, nn.Module],
) -> list[Site]:
    """``sites`` with their pictures: ``records`` holds, per rule call, the index of its first site, how many sites
    it returned, and what was recorded before it ran. Sites a call rewrote together share its pictures."""
    out = list(sites)
    for first, count, before in records:
        counterpart = alt.get(before.node)
        rewritten = out[first].rewritten and counterpart is not None and not counterpart[0]._erased
        pictures = {
            "before": before.picture(),
            "after": after(counterpart[0], original, modules) if rewritten and counterpart else None,
        }
        for i in range(first, first + count):
            out[i] = replace(out[i], subgraph=pictures)
    return out


def left_alone(pictures: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The pictures of a site rewritten by a pass but then left as it was (``to="auto"`` kept the original form):
    its neighbourhood before, nothing removed, no after."""
    if not pictures:
        return None
    before = pictures["before"]
    return {"before": {**before, "nodes": [{**n, "role": "kept"} for n in before["nodes"]]}, "after": None}


def with_shapes(sites: list[Site], gm: fx.GraphModule, inputs: tuple[torch.Tensor, ...]) -> list[Site]:
    """``sites`` with the shapes of their *after* pictures' nodes (the nodes a pass adds carry none of their own),
    propagated through the rewritten graph ``gm`` on ``inputs`` when some site was rewritten and the inputs are not
    on the meta device. Where propagation fails, the drawings go without shapes: validation judges the rewrite."""
    if not any(s.rewritten for s in sites) or any(t.device.type == "meta" for t in inputs):
        return sites  # (on meta, a 7B model's rewrite is the product: no second pass over its graph for a drawing)
    try:
        propagate_shapes(gm, inputs)
    except Exception as e:
        log.info("no shapes for the report's drawings after the pass: %s", one_line(e))
        return sites
    nodes = {n.name: n for n in gm.graph.nodes}
    out = []
    for site in sites:
        pictures = site.subgraph
        after = pictures.get("after") if pictures else None
        if not after:
            out.append(site)
            continue
        drawn = [
            {**n, "shape": n.get("shape") or (_shape(nodes[n["id"]]) if n["id"] in nodes else None)}
            for n in after["nodes"]
        ]
        out.append(replace(site, subgraph={**(pictures or {}), "after": {**after, "nodes": drawn}}))
    return out
