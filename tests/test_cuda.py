"""On a CUDA GPU: the rewrite holds where the user's model lives.

Skipped where torch sees no CUDA device (CI has none); on a GPU machine: ``python -m pytest tests/test_cuda.py``.
"""

from __future__ import annotations

import pytest
import torch

import fxsurgery
from fxsurgery.models import demo_model
from fxsurgery.verify.policy import float32_products, full_float32
from tests.conftest import assert_unchanged, snapshot

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none here)")

CUDA = torch.device("cuda")


@pytest.mark.parametrize("direction", [fxsurgery.linear_to_conv, fxsurgery.conv_to_linear])
@pytest.mark.parametrize("precision", ["native", "float64"])
def test_a_gpu_model_is_rewritten_on_the_gpu_with_its_weights_as_views(direction, precision):
    model = demo_model().to(CUDA).eval()
    x = torch.randn(2, 3, 32, 32, device=CUDA, generator=torch.Generator(CUDA).manual_seed(0))
    before, x_before = snapshot(model), x.clone()
    conv = torch.backends.cudnn.conv.fp32_precision  # torch's default: "tf32"
    res = direction(model, x, precision=precision)
    assert res.rewritten and res.validation.passed, res.summary()
    if precision == "float64":
        assert res.validation.max_rel_error < 1e-12
    else:  # compared in full float32, and the user told that cuDNN's TF32 would differ
        assert res.validation.max_rel_error < 1e-5
        assert any("TF32" in n for n in res.validation.notes) == (conv == "tf32"), res.validation.notes
    assert torch.backends.cudnn.conv.fp32_precision == conv  # the process's settings put back
    assert {p.device.type for p in res.module.parameters()} == {"cuda"}
    ours = {p.data_ptr() for p in model.parameters()}
    assert {p.data_ptr() for p in res.module.parameters()} <= ours  # views: no weight copied, none moved
    with torch.no_grad(), full_float32():  # (with cuDNN's TF32 on, ~1e-3 apart)
        got, want = res.module(x), model(x)
    assert got.device.type == "cuda"
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    assert_unchanged(model, before)
    assert torch.equal(x, x_before)


def test_the_tf32_note_names_the_products_this_process_lets_round():
    """TF32 asked for with torch's new API (cuBLAS's setting alone: torch.get_float32_matmul_precision would raise)."""
    model = demo_model().to(CUDA).eval()
    x = torch.randn(2, 3, 32, 32, device=CUDA)
    with float32_products("tf32", (torch.backends.cuda.matmul, torch.backends.cudnn.conv)):
        res = fxsurgery.conv_to_linear(model, x)
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"  # put back after validation
    assert res.validation.passed and res.validation.max_rel_error < 1e-5, res.summary()
    assert any("cuDNN convolutions and cuBLAS matrix products round to TF32" in n for n in res.validation.notes)


def test_a_half_precision_gpu_model_validates_at_its_dtype():
    model = demo_model().to(CUDA, torch.bfloat16).eval()
    x = torch.randn(2, 3, 32, 32, device=CUDA, dtype=torch.bfloat16)
    for direction in (fxsurgery.linear_to_conv, fxsurgery.conv_to_linear):
        res = direction(model, x)
        assert res.rewritten and res.validation.passed, res.summary()
        assert {p.dtype for p in res.module.parameters()} == {torch.bfloat16}


def test_check_exports_a_gpu_model_to_onnx_and_cross_checks_it(tmp_path):
    model = demo_model().to(CUDA).eval()
    x = torch.randn(2, 3, 32, 32, device=CUDA)
    report = fxsurgery.check(model, x, to="conv", out_dir=tmp_path)
    assert report.passed, report.summary()
    assert report.onnx.op_counts["rewritten"].get("Gemm", 0) == 0
    assert next(model.parameters()).device.type == "cuda"


def test_a_gpu_language_model_is_rewritten_in_the_token_layout_and_generates_the_originals_tokens():
    pytest.importorskip("transformers")
    from benchmarks.hf_models import build

    model, (ids,), _ = build("llama")
    model, ids = model.to(CUDA), ids.to(CUDA)
    res = fxsurgery.linear_to_conv(model, ids, token_layout=True, dynamic_sequence=True)
    assert not res.skipped and res.validation.passed, res.summary()
    lm = fxsurgery.generation_model(res, model, ids)
    prompt = torch.randint(3, 100, (2, 7), device=CUDA, generator=torch.Generator(CUDA).manual_seed(1))
    with full_float32():  # the rewritten convs in full float32 as the original's matrix products (not cuDNN's TF32)
        want = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(lm.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0), want)


def test_torchvision_on_the_gpu_both_directions():
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18(weights=None).to(CUDA).eval()
    x = torch.randn(2, 3, 64, 64, device=CUDA)
    for direction in (fxsurgery.linear_to_conv, fxsurgery.conv_to_linear):
        res = direction(model, x)
        assert res.rewritten and res.validation.passed, res.summary()


def test_auto_on_the_gpu_times_each_form_there():
    """``to="auto", runtime="torch"`` times a GPU model's layers and blocks on the GPU (each call waited for)."""
    model = demo_model().to(CUDA).eval()
    x = torch.randn(2, 3, 32, 32, device=CUDA)
    res = fxsurgery.rewrite(model, x, "auto", runtime="torch")
    assert res.validation.passed and res.sites, res.summary()
    assert {p.device.type for p in res.module.parameters()} == {"cuda"}
