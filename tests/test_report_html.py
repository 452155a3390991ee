"""``report.html``: written beside ``report.json`` by ``fxsurgery rewrite``, rebuilt by ``fxsurgery report DIR``,
self-contained, and rendered in a real headless browser (Chromium from the system packages: ``apt-get install -y
chromium``; ``.ci/run`` installs it), where every site's drawing must have drawn boxes."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fxsurgery.artifacts.report_html import render

ROOT = Path(__file__).resolve().parents[1]
BROWSER = next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)


@pytest.fixture(scope="module", params=["auto", "linear"])  # auto: the timings chart; linear: after-pictures
def out(tmp_path_factory, request):
    out = tmp_path_factory.mktemp("html") / "out"
    proc = subprocess.run([sys.executable, "-m", "fxsurgery", "rewrite", "fxsurgery.models:demo_model", "--to",
                           request.param,
                           "--input-shape", "2,3,32,32", "--target", "onnxruntime", "--artifacts", "none", "--out",
                           str(out), "--quiet"], capture_output=True, text=True, cwd=ROOT, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return out


def _dom(path: Path) -> str:
    proc = subprocess.run([BROWSER, "--headless=new", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000",
                           "--dump-dom", path.resolve().as_uri()], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.mark.skipif(BROWSER is None, reason="Chromium is not installed (apt-get install -y chromium)")
def test_every_site_drawing_renders_in_headless_chromium(out):
    data = json.loads((out / "report.json").read_text())
    dom = _dom(out / "report.html")
    n = len(data["sites"])
    assert n == {"auto": 6, "conv_to_linear": 3}[data["direction"]]
    drawings = re.findall(r'<svg class="site-drawing" data-site="([^"]+)"[^>]*data-rendered="yes"', dom)
    shared = re.findall(r'<a class="shared">([^<]+)</a>', dom)  # a block repeated is drawn once
    assert f'data-sites="{len(drawings)}"' in dom and f'data-sites-rendered="{len(drawings)}"' in dom
    assert len(drawings) + len(shared) == n and set(shared) <= set(drawings)
    assert set(drawings) <= {s["name"] for s in data["sites"]}
    assert dom.count('class="histogram"') == len(data["validation"]["error_histograms"]["outputs"]) == 1
    for site in (s for s in data["sites"] if s["name"] in drawings):  # the site's subgraph: every node in a box
        svg = re.search(rf'<svg class="site-drawing" data-site="{re.escape(site["name"])}".*?</svg>', dom).group(0)
        nodes = site["subgraph"]["before"]["nodes"] + (site["subgraph"]["after"] or {"nodes": []})["nodes"]
        assert len(nodes) >= 2 and svg.count("<rect") == len(nodes) + (site["subgraph"]["after"] is None)
        for node in nodes:
            assert f">{html.escape(node['label'])}</text>" in svg


def test_the_page_is_self_contained_and_rebuilt_from_report_json(out):
    page = (out / "report.html").read_text()
    assert not re.search(r'(src|href)="(https?:)?//', page) and "<link" not in page
    data = json.loads((out / "report.json").read_text())
    assert "report.html" in data["saved"]
    for s in data["sites"]:
        assert f"<code>{html.escape(s['name'])}</code>" in page  # each site has its row
    (out / "report.html").unlink()
    proc = subprocess.run([sys.executable, "-m", "fxsurgery", "report", str(out)], capture_output=True, text=True,
                          cwd=ROOT, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert (out / "report.html").read_text() == page


def test_text_from_the_model_is_escaped_and_a_failure_is_shown():
    site = {"name": "<script>alert(1)</script>", "pattern": "conv1x1", "status": "skipped", "reason": "a & b"}
    validation = {"passed": False, "max_abs_error": 1.0, "max_rel_error": 0.5, "rtol": 1e-4, "num_inputs": 2,
                  "batch_sizes": [2], "precision": "native", "worst": "output", "failure": "output: too far",
                  "error_histograms": {"bins": ["0", ">=1"], "outputs": {"output": [3, 1]}}}  # fmt: skip
    page = render({"passed": False, "direction": "conv_to_linear", "sites": [site], "validation": validation})
    assert "<script>alert" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "a &amp; b" in page
    assert "FAILED" in page and "output: too far" in page


def test_report_refuses_a_folder_without_a_report(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fxsurgery", "report", str(tmp_path)], capture_output=True,
                          text=True, cwd=ROOT, timeout=600)  # fmt: skip
    assert proc.returncode == 2 and "report.json not found" in proc.stderr and "Traceback" not in proc.stderr


_PAYLOAD = '<script>alert(1)</script><img src=x onerror="alert(2)">'


def _leaves(value, path=()):
    """Every place in a JSON value a crafted report could put markup: each leaf, and each key of an object."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield (*path, ("key", k))
            yield from _leaves(v, (*path, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _leaves(v, (*path, i))
    else:
        yield path


def _crafted(data, path):
    data = json.loads(json.dumps(data))
    holder = data
    for step in path[:-1]:
        holder = holder[step]
    last = path[-1]
    if isinstance(last, tuple):  # a key renamed to the payload
        holder[_PAYLOAD] = holder.pop(last[1])
    else:
        holder[last] = _PAYLOAD
    return data


def test_every_value_of_a_crafted_report_json_is_drawn_as_text(out):
    """Each field of a real report.json in turn (values and keys: validation, inputs, ONNX comparisons, op counts,
    timings, subgraphs, ...) replaced by markup: the page draws it as text, or refuses the report as malformed."""
    from fxsurgery.artifacts.report_html import MalformedReport

    data = json.loads((out / "report.json").read_text())
    places = list(_leaves(data))
    drawn = 0
    for path in places:
        try:
            page = render(_crafted(data, path))
        except MalformedReport:
            continue
        drawn += 1
        assert page.count("<script>") == 1 and "<img" not in page and 'onerror="alert' not in page, path
    assert len(places) > 100 and drawn > len(places) // 2  # most fields are drawn (the rest refused, not crashed)


def test_a_malformed_report_json_is_one_line_and_exit_2(out, tmp_path):
    data = json.loads((out / "report.json").read_text())
    data["validation"]["batch_sizes"] = 7  # not a list
    (tmp_path / "report.json").write_text(json.dumps(data))
    proc = subprocess.run([sys.executable, "-m", "fxsurgery", "report", str(tmp_path)], capture_output=True,
                          text=True, cwd=ROOT, timeout=600)  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "not a report fxsurgery wrote" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "report.html").exists()


@pytest.mark.skipif(BROWSER is None, reason="Chromium is not installed (apt-get install -y chromium)")
def test_a_failing_run_opens_with_its_failure_and_where_it_starts(tmp_path, monkeypatch):
    """A real failing check (the rewritten ONNX file's classifier weight scaled after export, as an exporter bug
    would): the page, rendered in headless Chromium, opens with a summary that says FAILED, which check failed,
    the comparison that failed, and the value the localization names first."""
    import importlib

    import onnx
    import torch
    from onnx import numpy_helper

    import fxsurgery
    from fxsurgery.artifacts.report_html import write_html
    from fxsurgery.artifacts.report_json import report_file
    from fxsurgery.models import demo_model

    stage = importlib.import_module("fxsurgery.verify.export_stage")
    export, tampered = stage.export_onnx, {}

    def export_then_tamper(module, inputs, path, **kw):
        export(module, inputs, path, **kw)
        if path.name == "rewritten.onnx":
            model = onnx.load(str(path))
            init = next(i for i in model.graph.initializer if i.name.startswith("classifier.1"))
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 1.5, init.name))
            tampered["value"] = next(n for n in model.graph.node if init.name in n.input).output[0]
            onnx.save(model, str(path))

    monkeypatch.setattr(stage, "export_onnx", export_then_tamper)
    x = torch.randn(2, 3, 32, 32)
    report = fxsurgery.check(demo_model().eval(), x, "conv", tmp_path / "o")
    assert not report.passed and report.surgery.passed  # the torch rewrite is right; its ONNX file is not
    page = write_html(report_file(report, saved={}, command="test", inputs=[("x", x)]), tmp_path / "report.html")
    dom = _dom(page)
    summary = re.search(r'<section id="summary">.*?</section>', dom, re.S).group(0)
    summary = html.unescape(re.sub(r"<[^>]+>", "", summary))  # the text a reader sees
    assert dom.index('id="summary"') < dom.index("<h2>Sites")  # the page opens with it
    assert "FAILED: see the failing checks below" in summary and "validation: passed" in summary
    assert "ONNX cross-check: FAILED" in summary and "ORT rewritten [opt" in summary
    assert f"the first value over the bound is {tampered['value']!r}" in summary
