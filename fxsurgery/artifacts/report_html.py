"""``report.html``: ``report.json`` drawn for people, one self-contained file (inline CSS and SVG, no network).

Per site the before/after drawing (the layer as it was, and what replaced it with the layout it runs in), the error
histogram of every output (validation, element by element, by decade of the error relative to the output scale),
the ONNX op census of both graphs and the runtime comparisons, the target's census, and with ``to="auto"`` the
ratio chart of the whole-model candidates. Built from ``report.json`` alone, so ``fxsurgery report DIR`` rebuilds it.
"""

from __future__ import annotations

import json
import math
import os
from html import escape
from pathlib import Path
from typing import Any

from fxsurgery.artifacts.site_drawings import LEGEND, drawing, signature

__all__ = ["render", "write_html", "MalformedReport"]

_CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ddd;padding:3px 8px;text-align:left;
vertical-align:top}th{background:#f4f4f4}.pass{color:#17803d;font-weight:600}.fail{color:#b3261e;font-weight:600}
.changed{background:#fff6d6}code{font-size:12px}svg text{font:11px monospace}.skip{color:#666}
pre.failure{white-space:pre-wrap;background:#fce8e6;padding:4px 8px;margin:4px 0;font-size:12px}
#summary{border:1px solid #ccc;padding:0 1em;background:#fafafa}details.site-group{margin:.5em 0}
"""
_RENDER_CHECK = """
const drawings = document.querySelectorAll("svg.site-drawing");
let rendered = 0;
for (const svg of drawings) {
  const box = svg.getBBox();
  if (box.width > 0 && box.height > 0 && svg.querySelectorAll("rect").length >= 2) {
    svg.dataset.rendered = "yes"; rendered += 1;
  }
}
document.body.dataset.sites = String(drawings.length);
document.body.dataset.sitesRendered = String(rendered);
"""


def write_html(data: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write :func:`render` of ``data`` (a ``report.json``) to ``path``."""
    out = Path(path)
    out.write_text(render(data), encoding="utf-8")
    return out


class MalformedReport(ValueError):
    """A ``report.json`` that is not what fxsurgery writes (a field of the wrong type, a missing key)."""


def render(data: dict[str, Any]) -> str:
    """The HTML page of one ``report.json``. Every value drawn from it is escaped (a crafted report draws text, never
    markup); a report whose fields are not of the types fxsurgery writes is a :class:`MalformedReport`."""
    try:
        return _render(data)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        raise MalformedReport(f"not a report fxsurgery wrote ({type(e).__name__}: {str(e)[:200]})") from e


def _e(value: Any) -> str:
    """Any value from the report, as text in the page."""
    return escape(str(value))


def _render(data: dict[str, Any]) -> str:
    verdict = '<span class="pass">PASSED</span>' if data.get("passed") else '<span class="fail">FAILED</span>'
    parts = [
        f"<h1>fxsurgery report: {_e(data.get('direction', ''))} {verdict}</h1>",
        _summary(data),
        _header(data),
        _sites(data.get("sites", [])),
        _validation(data.get("validation")),
        _onnx(data.get("onnx")),
        _target(data.get("target")),
        _quantized(data.get("quantized")),
        _timings(data.get("timings")),
        _notes(data.get("notes", [])),
    ]
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>fxsurgery report</title>'
        f"<style>{_CSS}</style></head><body>{''.join(parts)}<script>{_RENDER_CHECK}</script></body></html>"
    )


def _checks(data: dict[str, Any]) -> list[tuple[str, bool | None, list[str]]]:
    """Each check of the report: (name, passed or None where it did not run, what it found wrong)."""
    v, o, t, q = (data.get(k) for k in ("validation", "onnx", "target", "quantized"))
    out: list[tuple[str, bool | None, list[str]]] = [
        ("validation", None if not v else bool(v["passed"]), [v["failure"]] if v and v.get("failure") else []),
        ("ONNX cross-check", None if not o else bool(o["passed"]), list(o.get("failures", [])) if o else []),
    ]
    if t:
        census = t["census"]
        converts = None if "skipped" in census else census.get("rewritten") is not None or not census.get("original")
        errors = [f"{census['toolchain']} on the {k} model: {e}" for k, e in (census.get("errors") or {}).items()]
        out.append((f"target {t['name']} ({census['toolchain']})", converts, errors))
    if q:
        out.append((f"quantized ({q['recipe']})", bool(q["passed"]), list(q.get("failures", []))))
    return out


def _warnings(data: dict[str, Any]) -> list[str]:
    """What makes a passing report hollow: outputs below the comparison floor, no site rewritten."""
    v = data.get("validation") or {}
    out = [f"validation: {v['warning']}"] if v.get("warning") else []
    if not any(s["status"] == "rewritten" for s in data.get("sites", [])):
        out.append(
            "nothing was rewritten: the model is unchanged" + (" (no candidate found)" if not data.get("sites") else "")
        )
    return out


def _summary(data: dict[str, Any]) -> str:
    """The top of the page: the outcome, each check's verdict, and for each failure what it says and where (the
    localization), in full; then the warnings."""
    items = []
    for name, passed, found in _checks(data):
        mark = (
            '<span class="skip">not run</span>'
            if passed is None
            else '<span class="pass">passed</span>'
            if passed
            else '<span class="fail">FAILED</span>'
        )
        detail = "".join(f'<pre class="failure">{_e(f)}</pre>' for f in found)
        items.append(f"<li>{_e(name)}: {mark}{detail}</li>")
    warnings = "".join(f'<li class="fail">WARNING: {_e(w)}</li>' for w in _warnings(data))
    outcome = "every check passed" if data.get("passed") else "FAILED: see the failing checks below"
    return (
        f'<section id="summary"><h2>Summary</h2><p class="{"pass" if data.get("passed") else "fail"}">{outcome}'
        f"</p><ul>{''.join(items)}{warnings}</ul></section>"
    )


class _Html(str):
    """Markup this module built (its data already escaped): a table cell that is drawn as it is."""


def _table(header: tuple[str, ...], rows: list[tuple[Any, ...]], changed: list[bool] | None = None) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = []
    for i, row in enumerate(rows):
        cls = ' class="changed"' if changed and changed[i] else ""
        body.append(f"<tr{cls}>" + "".join(f"<td>{c if isinstance(c, _Html) else _e(c)}</td>" for c in row) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _header(data: dict[str, Any]) -> str:
    inputs = ", ".join(f"{i['name']} {'x'.join(map(str, i['shape']))} {i['dtype']}" for i in data.get("inputs", []))
    versions = ", ".join(f"{k} {v}" for k, v in (data.get("versions") or {}).items() if v)
    rows = [
        ("command", _Html(f"<code>{_e(data.get('command', ''))}</code>")),
        ("front end", data.get("frontend", "")),
        ("inputs", inputs),
        ("versions", versions),
        ("files", ", ".join(map(str, data.get("saved") or {}))),
    ]
    return _table(("", ""), rows)


def _sites(sites: list[dict[str, Any]]) -> str:
    """The sites grouped by pattern, each group collapsible; a site whose rewrite is the same as one drawn before in
    its group (:func:`~fxsurgery.artifacts.site_drawings.signature`: the same block repeated, the layers of a
    transformer) is not drawn again, and points to it."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for s in sites:
        groups.setdefault(s["pattern"], []).append(s)
    parts = []
    for pattern, members in groups.items():
        drawn: dict[str, str] = {}
        rows = []
        for s in members:
            status = (
                '<span class="pass">rewritten</span>'
                if s["status"] == "rewritten"
                else f'<span class="skip">skipped: {_e(s.get("reason", ""))}</span>'
            )
            key = signature(s)
            picture = (
                f'<span class="skip">the same layer, rewritten the same way, as <a class="shared">{_e(drawn[key])}</a> '
                "(drawn there; its neighbours may differ)</span>"
                if key in drawn
                else drawing(s)
            )
            drawn.setdefault(key, s["name"])
            rows.append((_Html(f"<code>{_e(s['name'])}</code>"), _Html(status), _Html(picture)))
        n = sum(s["status"] == "rewritten" for s in members)
        parts.append(
            f'<details open class="site-group"><summary><b>{_e(pattern)}</b>: {n} rewritten of {len(members)}'
            f"</summary>{_table(('site', 'outcome', 'before / after'), rows)}</details>"
        )
    n = sum(s["status"] == "rewritten" for s in sites)
    return f"<h2>Sites ({n} rewritten of {len(sites)})</h2>" + LEGEND + "".join(parts)


def _validation(v: dict[str, Any] | None) -> str:
    if not v:
        return "<h2>Validation</h2><p>not run</p>"
    verdict = '<span class="pass">passed</span>' if v["passed"] else '<span class="fail">failed</span>'
    text = (
        f"<h2>Validation: {verdict}</h2><p>{_e(v['num_inputs'])} inputs, batch sizes "
        f"{_e(', '.join(map(str, v['batch_sizes'])))}, {_e(v['precision'])}; max error relative to the output "
        f"scale {_num(v['max_rel_error'])} (tolerance {_num(v['rtol'])}); worst: {_e(v.get('worst', ''))}"
        f"{'; ' + _e(v['failure']) if v.get('failure') else ''}</p>"
    )
    hist = v.get("error_histograms") or {}
    for name, counts in (hist.get("outputs") or {}).items():
        text += f"<p>{_e(name)}: elements by |rewritten - original| / output scale</p>"
        text += _histogram(hist["bins"], counts, v["rtol"])
    return text


def _histogram(bins: list[str], counts: list[int], rtol: float) -> str:
    """Bars on a log scale of counts, one per decade; the tolerance's decade marked."""
    top = max(math.log10(c + 1) for c in counts) or 1.0
    bars = []
    for i, (b, c) in enumerate(zip(bins, counts)):
        h = 90 * math.log10(c + 1) / top
        x = 10 + i * 52
        bars.append(
            f'<rect x="{x}" y="{100 - h:.1f}" width="40" height="{h:.1f}" fill="#5b8def"/>'
            f'<text x="{x}" y="{96 - h:.1f}">{_e(c)}</text>'
            f'<text x="{x + 30}" y="112" transform="rotate(-40 {x + 30} 112)" text-anchor="end">'
            f"{_e(b)}</text>"
        )
    if rtol > 0:
        decade = math.floor(math.log10(rtol))
        label = f"1e{decade}..1e{decade + 1}"
        if label in bins:
            x = 10 + bins.index(label) * 52 + 20
            bars.append(
                f'<path d="M{x} 4 V102" stroke="#b3261e" stroke-dasharray="3"/>'
                f'<text x="{x + 3}" y="12" fill="#b3261e">tolerance</text>'
            )
    return f'<svg class="histogram" width="{20 + 52 * len(bins)}" height="170">{"".join(bars)}</svg>'


def _census_table(original: dict[str, int], rewritten: dict[str, int]) -> str:
    ops = sorted(set(original) | set(rewritten))
    rows = [(op, original.get(op, 0), rewritten.get(op, 0)) for op in ops]
    return _table(("op", "original", "rewritten"), rows, [original.get(op, 0) != rewritten.get(op, 0) for op in ops])


def _onnx(o: dict[str, Any] | None) -> str:
    if not o:
        return "<h2>ONNX cross-check</h2><p>not run</p>"
    verdict = '<span class="pass">passed</span>' if o["passed"] else '<span class="fail">failed</span>'
    rows = [
        (
            c["candidate"],
            c["reference"],
            c["batch"],
            _num(c["max_abs_error"]),
            _num(c["max_rel_error"]),
            "ok" if c["passed"] else _Html(f'<span class="fail">{_e(c["failure"])}</span>'),
        )
        for c in o.get("comparisons", [])
    ]
    extra = "".join(f'<pre class="failure">FAILED: {_e(f)}</pre>' for f in o.get("failures", []))
    extra += "".join(f"<p>skipped: {_e(s)}</p>" for s in o.get("skipped", []))
    return (
        f"<h2>ONNX cross-check ({_e(o['exporter'])} exporter): {verdict}</h2>"
        f"<p>{_e(o.get('rewrite_detail', ''))}</p><h3>Op census</h3>"
        + _census_table(o["op_counts"]["original"], o["op_counts"]["rewritten"])
        + "<h3>Runtime comparisons</h3>"
        + _table(("candidate", "reference", "batch", "max abs", "max rel", "result"), rows)
        + extra
    )


def _target(t: dict[str, Any] | None) -> str:
    if not t:
        return ""
    census = t["census"]
    head = f"<h2>Target {_e(t['name'])}: op census after {_e(census['toolchain'])}'s conversion</h2>"
    if "skipped" in census:
        return head + f"<p>not taken: {_e(census['skipped'])}</p>"
    verdict = census.get("verdict", "")
    cls = "fail" if verdict.startswith(("FAILED", "worse")) else "pass" if verdict.startswith("ok") else "skip"
    errors = "".join(
        f'<p>{_e(census["toolchain"])} on the {_e(label)} model:</p><pre class="failure">{_e(text)}</pre>'
        for label, text in (census.get("errors") or {}).items()
    )
    return (
        head
        + f'<p class="{cls}">{_e(verdict)}</p>'
        + _census_table(census.get("original") or {}, census.get("rewritten") or {})
        + errors
    )


def _quantized(q: dict[str, Any] | None) -> str:
    """``check(..., quantize=...)``: both versions quantized with one recipe, compared."""
    if not q:
        return ""
    verdict = '<span class="pass">passed</span>' if q["passed"] else '<span class="fail">FAILED</span>'
    share = q["within_one_step"]
    rows = [
        ("int8 outputs within one step of the original's", "n/a" if share is None else f"{float(share):.1%}"),
        ("int8 outputs identical", f"{float(q['identical']):.1%}"),
        ("error against the float original (PT2E)", _errors(q["error"])),
        ("error against the float original (onnxruntime QDQ)", _errors(q["onnx_error"]) if q["onnx_error"] else ""),
        ("XNNPACK", q["lowering"]),
    ]
    census = q["census"]
    return (
        f"<h2>Quantized cross-check ({_e(q['recipe'])}): {verdict}</h2>"
        + _table(("", ""), rows)
        + _census_table(census["original"], census["rewritten"])
        + "".join(f'<p class="fail">{_e(f)}</p>' for f in q["failures"])
        + "".join(f"<p>skipped: {_e(s)}</p>" for s in q["skipped"])
    )


def _errors(e: dict[str, Any]) -> str:
    return f"original {float(e['original']):.4g}, rewritten {float(e['rewritten']):.4g}"


def _timings(t: dict[str, Any] | None) -> str:
    if not t:
        return ""
    whole = t.get("whole_model", {})
    rows = [
        (c["site"], c.get("direction", ""), c["chosen"], _num(c["ratio"]) if "ratio" in c else c.get("why", ""))
        for c in t.get("sites", [])
    ]
    bars = []
    top = max([1.2, *(v.get("high", v["ratio"]) for v in whole.values())])
    for i, (label, v) in enumerate(whole.items()):
        y, w = 10 + i * 26, 300 * v["ratio"] / top
        bars.append(
            f'<text x="4" y="{y + 13}">{_e(label)}</text><rect x="90" y="{y}" width="{w:.0f}" '
            f'height="18" fill="#5b8def"/><text x="{96 + w:.0f}" y="{y + 13}">{v["ratio"]:.2f}</text>'
        )
    one = 90 + 300 / top
    chart = (
        f'<svg class="ratio-chart" width="460" height="{20 + 26 * len(whole)}">{"".join(bars)}'
        f'<path d="M{one:.0f} 4 V{14 + 26 * len(whole)}" stroke="#b3261e"/></svg>'
    )
    return (
        f'<h2>to="auto" on {_e(t.get("runtime"))}: chose {_e(t.get("chosen"))}</h2>'
        "<p>whole model, candidate / original (red: 1.0; below is faster)</p>"
        + chart
        + _table(("site", "direction", "chosen", "ratio"), rows)
    )


def _notes(notes: list[str]) -> str:
    return "" if not notes else "<h2>Notes</h2><ul>" + "".join(f"<li>{_e(n)}</li>" for n in notes) + "</ul>"


def _num(x: Any) -> _Html:
    return _Html(_e(f"{x:.3g}" if isinstance(x, (int, float)) else json.dumps(x)))
