"""``target=``: the layouts and patterns a deployment target gets, each stated with its reason, and the op census
after the target's own conversion (onnxruntime here; Core ML and ExecuTorch when installed). The outcomes are read
from the rewritten graph and from each toolchain's own output, never from fxsurgery's description of them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import fxsurgery
from fxsurgery.models import demo_model

ROOT = Path(__file__).resolve().parents[1]


class Strided(nn.Module):
    """A ResNet-style block: a strided 1x1 downsample beside a plain 1x1 conv, and a pooled Linear head."""

    def __init__(self):
        super().__init__()
        self.body = nn.Conv2d(4, 8, 1, stride=2)
        self.down = nn.Conv2d(4, 8, 1, stride=2)
        self.mix = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        h = self.mix(torch.relu(self.body(x)) + self.down(x))
        return self.fc(h.mean((2, 3)))


def test_the_coreml_target_carries_heads_in_the_batch_layout_and_says_why():
    model, x = demo_model(), torch.randn(1, 3, 32, 32)
    plain = fxsurgery.linear_to_conv(model, x)
    coreml = fxsurgery.linear_to_conv(model, x, target="coreml")
    batch = fxsurgery.linear_to_conv(model, x, batch_layout="batch")
    assert coreml.module.code == batch.module.code != plain.module.code
    assert any(n.startswith("target coreml: batch_layout='batch' (") for n in coreml.notes)
    assert coreml.validation.passed
    given = fxsurgery.linear_to_conv(model, x, target="coreml", batch_layout="spatial", validate=False)
    assert given.module.code == plain.module.code
    assert any("batch_layout='spatial' as given (the target picks 'batch'" in n for n in given.notes)


def test_the_xnnpack_target_leaves_strided_pointwise_convs_with_the_reason():
    model, x = Strided().eval(), torch.randn(2, 4, 8, 8)
    res = fxsurgery.conv_to_linear(model, x, target="executorch-xnnpack")
    status = {s.name: (s.status, s.reason) for s in res.sites}
    for name in ("body", "down"):
        assert status[name][0] == "skipped" and "XNNPACK does not delegate the strided slice" in status[name][1]
    assert status["mix"][0] == "rewritten" and res.validation.passed
    assert isinstance(res.module.get_submodule("body"), nn.Conv2d)
    assert not isinstance(res.module.get_submodule("mix"), nn.Conv2d)
    plain = fxsurgery.conv_to_linear(model, x, validate=False)
    assert {s.name for s in plain.rewritten} == {"body", "down", "mix"}


def test_an_unknown_target_is_one_clear_error():
    with pytest.raises(fxsurgery.InputError, match=r"target must be one of \['coreml', 'executorch-xnnpack'"):
        fxsurgery.linear_to_conv(demo_model(), torch.randn(1, 3, 32, 32), target="tensorrt")


def test_check_reports_the_onnxruntime_census_after_its_optimizations(tmp_path):
    model, x = demo_model(), torch.randn(2, 3, 32, 32)
    report = fxsurgery.check(model, x, "conv", tmp_path, target="onnxruntime")
    census = report.target["census"]
    assert report.target["name"] == "onnxruntime" and census["toolchain"] == "onnxruntime"
    # the demo's three Linear layers become 1x1 convs: onnxruntime's optimized graph runs no Gemm/MatMul for them
    linear_ops = ("Gemm", "MatMul", "FusedGemm", "FusedMatMul")
    assert sum(census["original"].get(op, 0) for op in linear_ops) >= 3
    assert sum(census["rewritten"].get(op, 0) for op in linear_ops) == 0
    assert sum(v for k, v in census["rewritten"].items() if "Conv" in k) > sum(
        v for k, v in census["original"].items() if "Conv" in k
    )
    assert "op census after onnxruntime's conversion" in report.summary()


def test_a_missing_toolchain_is_said_not_raised(monkeypatch, tmp_path):
    import importlib.util

    from fxsurgery.runtimes import census, registry

    real = importlib.util.find_spec
    monkeypatch.setattr(registry.importlib.util, "find_spec", lambda n, *a: None if n == "coremltools" else real(n, *a))
    out = census.census("coreml", demo_model(), demo_model(), (torch.randn(1, 3, 32, 32),))
    assert out == {
        "toolchain": "coremltools",
        "skipped": 'coremltools is not installed: pip install "fxsurgery[coreml]"',
    }


def test_the_cli_target_is_in_report_json(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "fxsurgery", "rewrite", "fxsurgery.models:demo_model", "--to", "conv",
                           "--input-shape", "1,3,32,32", "--target", "coreml", "--artifacts", "none", "--out",
                           str(out), "--quiet"], capture_output=True, text=True, cwd=ROOT, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    data = json.loads((out / "report.json").read_text())
    assert data["target"]["name"] == "coreml" and data["target"]["census"]["toolchain"] == "coremltools"
    assert any(n.startswith("target coreml: batch_layout='batch'") for n in data["notes"])


def test_the_coreml_census_shows_the_batch_layout_adds_no_transpose():
    pytest.importorskip("coremltools", reason='Core ML is optional: pip install "fxsurgery[coreml]"')
    from fxsurgery.runtimes.census import census

    model, x = demo_model(), torch.randn(1, 3, 32, 32)
    spatial = fxsurgery.linear_to_conv(model, x, validate=False).module
    batch = fxsurgery.linear_to_conv(model, x, target="coreml", validate=False).module
    a, b = census("coreml", model, spatial, (x,)), census("coreml", model, batch, (x,))
    assert "skipped" not in a and "skipped" not in b, (a, b)
    assert b["rewritten"].get("transpose", 0) < a["rewritten"].get("transpose", 0)
    assert b["rewritten"]["conv"] == a["rewritten"]["conv"] > a["original"].get("conv", 0)


def test_the_xnnpack_census_has_no_slice_outside_the_delegates_where_the_target_leaves_strided_convs():
    pytest.importorskip("executorch", reason="ExecuTorch is optional: pip install fxsurgery[executorch]")
    from fxsurgery.runtimes.census import census

    model, x = Strided().eval(), torch.randn(2, 4, 8, 8)
    plain = fxsurgery.conv_to_linear(model, x, validate=False).module
    target = fxsurgery.conv_to_linear(model, x, target="executorch-xnnpack", validate=False).module
    a, b = census("executorch-xnnpack", model, plain, (x,)), census("executorch-xnnpack", model, target, (x,))
    assert "skipped" not in a and "skipped" not in b, (a, b)
    assert a["rewritten"].get("slice_copy", 0) > 0, a  # the strided rewrite's slices stay outside XNNPACK
    assert b["rewritten"] == b["original"], b  # left as convs, the strided layers stay inside the delegates


class FixedMask(nn.Module):
    """A wrapper holding a fixed, expanded mask (not a buffer): torch.export lifts it as a constant."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.fixed = nn.Linear(8, 4), {"mask": torch.ones(1, 6, 8).expand(2, 6, 8)}

    def forward(self, x):
        return self.fc(x * self.fixed["mask"])


def test_a_constant_the_export_lifted_lowers_to_xnnpack_as_the_original_does():
    """The raised graph keeps it as a buffer, made dense (ExecuTorch's constant pass fails on an expanded one)."""
    pytest.importorskip("executorch", reason="ExecuTorch is optional: pip install fxsurgery[executorch]")
    from fxsurgery.verify.quantized import lowered_outputs

    model, x = FixedMask().eval(), torch.randn(2, 6, 8)
    res = fxsurgery.linear_to_conv(model, x, frontend="export", token_layout=True)
    assert res.frontend == "export" and res.rewritten
    got = lowered_outputs(torch.export.export(res.module, (x,), strict=False), (x,))
    assert not isinstance(got, str), got
    torch.testing.assert_close(got[0], model(x), rtol=1e-5, atol=1e-6)


def test_a_masked_bert_in_the_token_layout_converts_in_openvino():
    """The attention's fully-masked-row guard is written with ops OpenVINO converts (it called isneginf, which
    OpenVINO's PyTorch frontend does not know). (coremltools 9 cannot convert transformers' own mask building,
    ``new_ones``, in the original either.)"""
    pytest.importorskip("openvino", reason='OpenVINO is optional: pip install "fxsurgery[openvino]"')
    transformers = pytest.importorskip("transformers")
    from fxsurgery.runtimes.census import census

    config = transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, num_labels=3
    )
    torch.manual_seed(0)

    class Masked(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = transformers.BertForSequenceClassification(config).eval()

        def forward(self, ids, mask):
            return self.bert(ids, attention_mask=mask).logits

    model = Masked().eval()
    ids, mask = torch.randint(0, 100, (2, 8)), torch.ones(2, 8, dtype=torch.long)
    mask[1, 5:] = 0  # one padded sequence
    res = fxsurgery.linear_to_conv(model, (ids, mask), token_layout=True)
    assert len(res.rewritten) == 12
    out = census("openvino", model, res.module, (ids, mask))
    assert "skipped" not in out, out
    assert out["rewritten"]["Convolution"] >= 12 > out["original"].get("Convolution", 0)


def test_the_openvino_census_shows_the_linears_became_convolutions():
    pytest.importorskip("openvino", reason='OpenVINO is optional: pip install "fxsurgery[openvino]"')
    from fxsurgery.runtimes.census import census

    model, x = demo_model(), torch.randn(2, 3, 32, 32)
    res = fxsurgery.linear_to_conv(model, x, target="openvino")
    out = census("openvino", model, res.module, (x,))
    assert "skipped" not in out, out
    assert out["original"]["FullyConnected"] == 3 and "FullyConnected" not in out["rewritten"]
    assert out["rewritten"]["Convolution"] == out["original"]["Convolution"] + 3


def test_the_target_picks_the_layout_only_where_none_was_given():
    from fxsurgery.options import Options, resolve

    assert resolve(Options(batch_layout="batch"), {"target": None}).batch_layout == "batch"
    assert resolve(None, {"target": "coreml"}).batch_layout == "batch"
    assert resolve(None, {"target": "coreml", "batch_layout": "spatial"}).batch_layout == "spatial"
    assert Options(target="executorch-xnnpack").batch_layout == "batch"  # quantized after the rewrite
    assert Options(target="openvino").batch_layout == "spatial" == Options().batch_layout
