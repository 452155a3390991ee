"""The drawing of one site in ``report.html`` (:mod:`fxsurgery.artifacts.report_html`): its neighbourhood in the
graph before the pass and after it, as inline SVG boxes in rows with arrows, shapes under the labels; and the
signature that tells two drawings of the same block repeated apart from different ones."""

from __future__ import annotations

import json
from html import escape
from typing import Any

__all__ = ["LEGEND", "drawing", "signature"]

_CHAR = 6.7  # px per character of the 11px monospace font


def _e(value: Any) -> str:
    """Any value from the report, as text in the page."""
    return escape(str(value))


def signature(site: dict[str, Any]) -> str:
    """The layer a site's drawing is about, before and after the pass, without the graph's node names: its label
    (the module's short name and shape, ``self.query: Linear 32->32``) and value shape on each side. Equal for the
    same layer of a block repeated (the neighbours, which the report draws once, may differ: one layer reads the
    embeddings' norm, the next the previous layer's)."""
    pictures = site.get("subgraph")
    if not pictures:
        return json.dumps([site["status"], site.get("before"), site.get("after"), site.get("input_shape")])
    drawn = []
    for side in ("before", "after"):
        picture = pictures.get(side) or {"nodes": []}
        drawn.append([[n["label"], n.get("shape"), n["role"]] for n in picture["nodes"] if n.get("site")])
    return json.dumps([site["status"], site.get("reason"), drawn])


_FILL = {"removed": "#fce8e6", "new": "#e6f4ea", "kept": "#f1f3f4"}


_MARKER = (
    '<defs><marker id="arrow" markerWidth="8" markerHeight="8" refX="6" refY="3" orient="auto">'
    '<path d="M0,0 L6,3 L0,6 z" fill="#555"/></marker></defs>'
)


LEGEND = (
    "<p>Drawings: the site (blue frame) and its neighbourhood in the graph, before the pass and after it; "
    f'<span style="background:{_FILL["removed"]}">removed by the pass</span>, '
    f'<span style="background:{_FILL["new"]}">added by the pass</span>, '
    f'<span style="background:{_FILL["kept"]}">unchanged</span>; parameters are not drawn.</p>'
)


def drawing(site: dict[str, Any]) -> str:
    """The site's subgraph before and after the pass, side by side (older reports: its two descriptions)."""
    pictures = site.get("subgraph")
    if not pictures:
        return _described(site)
    before = _panel(pictures["before"], "before", 0.0)
    if pictures.get("after"):
        after = _panel(pictures["after"], "after", before[0] + 36)
    else:  # a skipped site, or a rewritten one whose counterpart the cleanup removed
        text = "left as it is" if site["status"] != "rewritten" else "rewritten (not drawn)"
        after = _panel(
            {"nodes": [{"id": "-", "label": text, "role": "kept", "site": False}], "edges": []}, "after", before[0] + 36
        )
    width, height = after[0], max(before[1], after[1])
    return (
        f'<svg class="site-drawing" data-site="{_e(site["name"])}" width="{width:.0f}" height="{height:.0f}" '
        f'xmlns="http://www.w3.org/2000/svg">{_MARKER}{before[2]}{after[2]}</svg>'
        f'<div class="skip">{_e(site.get("before") or "")}{" &rarr; " if site.get("after") else ""}'
        f"{_e(site.get('after') or '')}</div>"
    )


def _layers(picture: dict[str, Any]) -> list[list[dict[str, Any]]]:
    """The nodes in rows, each below everything it reads (longest path from the picture's sources)."""
    depth = {n["id"]: 0 for n in picture["nodes"]}
    for _ in range(len(depth)):
        for a, b in picture["edges"]:
            depth[b] = max(depth[b], depth[a] + 1)
    rows: list[list[dict[str, Any]]] = [[] for _ in range(max(depth.values(), default=0) + 1)]
    for n in picture["nodes"]:
        rows[depth[n["id"]]].append(n)
    return rows


def _panel(picture: dict[str, Any], title: str, x0: float) -> tuple[float, float, str]:
    """One picture as boxes in rows with arrows, from ``x0``: (right edge, height, SVG items)."""
    items, centre = [f'<text x="{x0:.0f}" y="12" font-weight="bold">{title}</text>'], {}
    right, y = x0 + 60, 22
    for row in _layers(picture):
        x, tallest = x0, 0
        for n in row:
            text = [n["label"]] + ([n["shape"]] if n.get("shape") else [])
            w, h = max(len(t) for t in text) * _CHAR + 12, 8 + 14 * len(text)
            frame = 'stroke="#1a73e8" stroke-width="2"' if n.get("site") else 'stroke="#888"'
            items.append(
                f'<rect x="{x:.0f}" y="{y}" width="{w:.0f}" height="{h}" rx="4" fill="{_FILL[n["role"]]}" '
                f"{frame}><title>{_e(n['id'])}</title></rect>"
            )
            items += [
                f'<text x="{x + 6:.0f}" y="{y + 15 + 14 * k}" fill="{"#666" if k else "#222"}">{_e(t)}</text>'
                for k, t in enumerate(text)
            ]
            centre[n["id"]] = (x + w / 2, y, y + h)
            x, tallest = x + w + 14, max(tallest, h)
        right, y = max(right, x), y + tallest + 22
    for a, b in picture["edges"]:
        (xa, _, ya), (xb, yb, _) = centre[a], centre[b]
        items.append(
            f'<path d="M{xa:.0f} {ya} L{xb:.0f} {yb - 2}" stroke="#555" fill="none" marker-end="url(#arrow)"/>'
        )
    return right, y, "".join(items)


def _described(site: dict[str, Any]) -> str:
    """Two lanes of boxes: the input map, then the layer before, and (rewritten sites) what replaced it."""
    shape = site.get("input_shape")
    source = "x".join(map(str, shape)) if shape else "input"
    lanes = [("before", [source, site.get("before") or site["pattern"]])]
    if site["status"] == "rewritten":
        lanes.append(("after", [source, site.get("after") or "rewritten"]))
    else:
        lanes.append(("after", [source, "left as it is"]))
    width = int(60 + max(sum(len(t) * _CHAR + 40 for t in boxes) for _, boxes in lanes))
    items = []
    for row, (label, boxes) in enumerate(lanes):
        y, x = 8 + row * 34, 56.0
        items.append(f'<text x="2" y="{y + 15}">{label}</text>')
        for k, text in enumerate(boxes):
            w = len(text) * _CHAR + 12
            fill = (
                "#e8f0fe" if k == 0 else "#e6f4ea" if label == "after" and site["status"] == "rewritten" else "#f1f3f4"
            )
            items.append(
                f'<rect x="{x:.0f}" y="{y}" width="{w:.0f}" height="22" rx="4" fill="{fill}" '
                f'stroke="#888"/><text x="{x + 6:.0f}" y="{y + 15}">{_e(text)}</text>'
            )
            if k + 1 < len(boxes):
                items.append(f'<path d="M{x + w:.0f} {y + 11} h22" stroke="#555" marker-end="url(#arrow)"/>')
            x += w + 28
    size = f'width="{width}" height="{12 + 34 * len(lanes)}"'
    return (
        f'<svg class="site-drawing" data-site="{_e(site["name"])}" {size} xmlns="http://www.w3.org/2000/svg">'
        f"{_MARKER}{''.join(items)}</svg>"
    )
