"""The benchmark harness runs (a smoke run on tiny models, one pair); no timing is asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # the whole harness at --quick, 75 s: runs with -m slow
def test_harness_smoke_run(tmp_path):
    out = tmp_path / "results"
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--out", str(out)], capture_output=True,
                          text=True, cwd=ROOT, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.with_suffix(".json").read_text())
    assert {"machine", "rewrite_cost", "memory", "check_cost", "latency", "auto"} <= set(data)
    assert {(r["runtime"], r["direction"]) for r in data["latency"]} == {
        (rt, d) for rt in ("torch eager", "onnxruntime") for d in ("linear_to_conv", "conv_to_linear")
    }
    assert all(r["ratio"]["pairs"] == 1 and r["ratio"]["median"] > 0 for r in data["latency"])
    assert {r["runtime"] for r in data["auto"]} == {"torch eager", "onnxruntime"}
    assert all(set(r["ratios"]) == {"auto", "all-conv", "all-linear"} | (
        {"torchscript-export"} if r["runtime"] == "onnxruntime" else set()) for r in data["auto"])
    assert [r["convs"] for r in data["rewrite_scale"]] == [8, 16]
    assert all(r["chosen"] in ("original", "auto", "all-conv", "all-linear") for r in data["auto"])
    md = out.with_suffix(".md").read_text()
    assert "| case |" in md and "| model |" in md
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"


def test_unknown_suite_is_refused():
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "nonsense"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2 and "unknown suite" in proc.stderr


def test_merge_replaces_only_the_rows_measured_again():
    from benchmarks.bench import merge

    old = {"machine": "m", "command": "python -m benchmarks", "rewrite_cost": [{"model": "vgg16"}],
           "latency": [{"case": "a", "direction": "d", "batch": 1, "runtime": "r", "ratio": 1.5},
                       {"case": "b", "direction": "d", "batch": 1, "runtime": "r", "ratio": 0.9}]}  # fmt: skip
    new = {"machine": "m", "latency": [{"case": "a", "direction": "d", "batch": 1, "runtime": "r", "ratio": 1.0},
                                       {"case": "c", "direction": "d", "batch": 8, "runtime": "r", "ratio": 1.1}]}  # fmt: skip
    out = merge(old, new)
    assert out["rewrite_cost"] == old["rewrite_cost"]
    assert [(r["case"], r["ratio"]) for r in out["latency"]] == [("a", 1.0), ("b", 0.9), ("c", 1.1)]


def test_the_cuda_benchmark_runs_at_quick_sizes_where_there_is_no_gpu(tmp_path):
    """benchmarks/cuda.py on whatever device torch has (here, the CPU): every case rewritten, validated and timed."""
    out = tmp_path / "cuda.md"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.cuda", "--quick", "--pairs", "1", "--out", str(out)],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    rows = [line for line in out.read_text().splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) == 5 and all("| passed (" in r and r.count("**") == 4 for r in rows), rows
