"""``fxsurgery.benchmark`` and ``fxsurgery bench``: they run, cover every runtime and batch asked, leave the model
and its inputs as they were, and refuse bad input with one message. No timing is asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fxsurgery
from fxsurgery.models import demo_model

ROOT = Path(__file__).resolve().parents[1]


def test_benchmark_times_every_runtime_and_batch_and_touches_nothing():
    model, x = demo_model().train(), torch.randn(2, 3, 32, 32)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    before = x.clone()
    report = fxsurgery.benchmark(model, x, "conv", runtimes=("torch", "onnxruntime"), batches=(1, 3), pairs=1)
    assert [(r.runtime, r.batch) for r in report.rows] == [("torch", 1), ("onnxruntime", 1), ("torch", 3),
                                                           ("onnxruntime", 3)]  # fmt: skip
    assert report.direction == "linear_to_conv" and report.rewritten_sites == 3
    assert all(r.ratio.pairs == 1 and r.ratio.median > 0 and r.noise.median > 0 for r in report.rows)
    assert model.training and torch.equal(x, before)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    json.dumps(report.to_dict())
    assert "rewritten/original" in report.summary() and "noise floor" in report.summary()


def test_benchmark_refuses_an_unknown_runtime():
    with pytest.raises(fxsurgery.InputError, match="runtimes must be some of"):
        fxsurgery.benchmark(demo_model(), torch.randn(1, 3, 32, 32), "conv", runtimes=("tvm",))


def test_benchmark_on_openvino():
    pytest.importorskip("openvino", reason='OpenVINO is optional: pip install "fxsurgery[openvino]"')
    report = fxsurgery.benchmark(demo_model(), torch.randn(2, 3, 32, 32), "linear", runtimes=("openvino",), pairs=1)
    assert [r.runtime for r in report.rows] == ["openvino"] and report.rows[0].ratio.median > 0


def test_the_bench_command_prints_json_and_draws_the_chart(tmp_path):
    chart = tmp_path / "chart.png"
    proc = subprocess.run([sys.executable, "-m", "fxsurgery", "bench", "fxsurgery.models:demo_model", "--to", "linear",
                           "--input-shape", "2,3,32,32", "--runtime", "onnxruntime", "--batch", "1,2", "--pairs", "1",
                           "--json", "--quiet", "--chart", str(chart)], capture_output=True, text=True, cwd=ROOT,
                          timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert [(r["runtime"], r["batch"]) for r in data["rows"]] == [("onnxruntime", 1), ("onnxruntime", 2)]
    assert data["direction"] == "conv_to_linear" and chart.read_bytes()[:4] == b"\x89PNG"


def test_the_bench_command_refuses_an_unknown_runtime_in_one_line():
    proc = subprocess.run([sys.executable, "-m", "fxsurgery", "bench", "fxsurgery.models:demo_model", "--to", "conv",
                           "--input-shape", "1,3,32,32", "--runtime", "onnxruntime,tvm", "--quiet"],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "unknown runtime 'tvm'" in proc.stderr
