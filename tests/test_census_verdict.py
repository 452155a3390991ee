"""The verdict on a deployment target's op census: whether the rewritten model converts where the original does
(and the whole toolchain error when it does not), and whether it keeps as much in the target's fast path. The
censuses here are written by hand, as a toolchain would report them; a rewrite the toolchain cannot convert fails
the check."""

from __future__ import annotations

import dataclasses

import torch

import fxsurgery
from fxsurgery.models import demo_model
from fxsurgery.runtimes.census import verdict

OPENVINO_ERROR = (
    "OpConversionFailure: Check 'false' failed at src/frontends/common/src/frontend.cpp:94:\n"
    "FrontEnd API failed with OpConversionFailure:\nModel wasn't fully converted. Failed operations detailed log:\n"
    "-- aten::isneginf with a message:\nNone\nSummary:\n-- Conversion is failed for: aten::isneginf"
)


def _census(original, rewritten, errors=None):
    return {"toolchain": "openvino", "original": original, "rewritten": rewritten, "errors": errors or {}}


def test_a_rewrite_the_toolchain_cannot_convert_fails_with_the_line_that_names_the_op():
    line = verdict(_census({"Convolution": 1}, None, {"rewritten": OPENVINO_ERROR}))
    assert line == (
        "FAILED: the rewritten model does not convert (Conversion is failed for: aten::isneginf); the original does"
    )


def test_an_original_that_does_not_convert_is_said_not_blamed_on_the_rewrite():
    assert verdict(_census(None, {"Convolution": 2}, {"original": OPENVINO_ERROR})).startswith(
        "the rewritten model converts; the original does not (Conversion is failed for: aten::isneginf)"
    )
    assert verdict(_census(None, None, {"original": OPENVINO_ERROR, "rewritten": OPENVINO_ERROR})).startswith(
        "neither model converts"
    )


def test_more_delegates_and_ops_left_outside_them_are_worse():
    original = {"delegate": 1, "getitem": 0}
    rewritten = {"delegate": 3, "mean": 10, "permute_copy": 2}
    line = verdict({"toolchain": "executorch", "original": original, "rewritten": rewritten, "errors": {}})
    assert line.startswith("worse: more delegates (the graph is split); left outside the delegates: mean +10, ")
    assert "permute_copy +2; 2 more transposes" in line and "delegates 1 -> 3" in line


def test_fewer_transposes_and_the_same_delegates_are_ok():
    line = verdict(_census({"Transpose": 10, "MatMul": 14}, {"Transpose": 1, "Conv": 14}))
    assert line == "ok (transposes 10 -> 1, ops 24 -> 15)"


def test_a_check_whose_target_cannot_convert_the_rewrite_does_not_pass(tmp_path):
    x = torch.randn(1, 3, 32, 32)
    report = fxsurgery.check(demo_model(), x, "conv", tmp_path, target="onnxruntime")
    assert report.passed and report.target["census"]["verdict"].startswith(("ok", "worse"))
    census = {**report.target["census"], "rewritten": None, "errors": {"rewritten": OPENVINO_ERROR}}
    failed = dataclasses.replace(report, target={**report.target, "census": census})
    assert not failed.passed
    summary = failed.summary()
    assert "onnxruntime on the rewritten model:\n  OpConversionFailure: Check 'false' failed" in summary
    assert "  -- Conversion is failed for: aten::isneginf" in summary  # the whole error, not its first line
