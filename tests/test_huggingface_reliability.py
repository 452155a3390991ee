"""The reliability cases found on HuggingFace and timm models (small configs, random weights, no hub access):
children read by untraceable parents, weights tied across an untraceable root, tracing that writes into the
model, and output classes that must come back as they went in."""

from __future__ import annotations

import pytest
import torch

import fxsurgery

transformers = pytest.importorskip("transformers")
l2c, c2l = fxsurgery.linear_to_conv, fxsurgery.conv_to_linear


def transformers_layer():
    return transformers.models.mobilenet_v2.modeling_mobilenet_v2.MobileNetV2ConvLayer


def _gpt2():
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=100, n_positions=64, bos_token_id=0,
                                  eos_token_id=0)  # fmt: skip
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg).eval(), torch.randint(0, 100, (2, 8))


@pytest.mark.parametrize("surgery", [l2c, c2l], ids=["linear_to_conv", "conv_to_linear"])
def test_hf_mobilenet_v2_runs_after_the_rewrite_and_keeps_its_output_class(surgery):
    """Its conv layers read ``self.convolution.stride`` in their own (untraceable) forward."""
    cfg = transformers.MobileNetV2Config(num_labels=5, image_size=32, depth_multiplier=0.35)
    torch.manual_seed(0)
    m = transformers.MobileNetV2ForImageClassification(cfg).eval()
    x = torch.randn(2, 3, 32, 32)
    res = surgery(m, x)
    assert res.validation.passed
    out, expected = res.module(x), m(x)
    assert type(out) is type(expected)
    torch.testing.assert_close(out.logits, expected.logits, rtol=1e-4, atol=1e-5)
    if surgery is l2c:
        assert [s.name for s in res.rewritten] == ["classifier"]
    if surgery is l2c:  # fx: the layers whose parent reads their attributes stay as they were
        kept = [n for n, mod in res.module.named_modules() if type(mod) is transformers_layer()]
        assert kept and res.frontend == "fx"
    else:  # fx cannot reach a single conv; torch.export reaches them all (frontend="auto" picks it)
        assert res.frontend == "export"
        pointwise = {n for n, mod in m.named_modules() if isinstance(mod, torch.nn.Conv2d) and mod.kernel_size == (1, 1)}
        assert pointwise and pointwise <= {s.name for s in res.rewritten}
        assert all(s.reason.startswith("groups=") for s in res.skipped), res.summary()


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_gpt2_lm_head_tied_to_the_embedding_stays_tied(frontend):
    m, ids = _gpt2()
    res = l2c(m, ids, token_layout=True, frontend=frontend)
    assert {s.name: s.reason for s in res.sites}["lm_head"] == "weight shared with transformer.wte (tied weights)"
    assert len(list(res.module.parameters())) == len(list(m.parameters()))
    assert res.module.lm_head.weight is res.module.transformer.wte.weight
    assert res.validation.passed  # the output holds a DynamicCache: compared attribute by attribute


def test_a_layer_of_an_untraceable_root_is_named_by_its_path_and_can_be_excluded():
    m, ids = _gpt2()
    res = l2c(m, ids, token_layout=True, exclude=["lm_head"], frontend="fx")
    assert (res.sites[0].name, res.sites[0].reason) == ("lm_head", "excluded by the caller")
    # the Linears of the untraceable transformer are listed too, with why
    linears = {n for n, x in m.named_modules() if n.startswith("transformer.") and type(x).__name__ == "Conv1D"}
    assert {s.name for s in res.sites[1:]} == linears
    assert all(s.reason.startswith("inside transformer, which was left untouched: ") for s in res.sites[1:])


def test_levit_tracing_leaves_the_models_caches_alone_and_a_second_call_works():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    m = timm.create_model("levit_128s", pretrained=False, num_classes=5, img_size=64).eval()
    x = torch.randn(2, 3, 64, 64)
    first = l2c(m, x)
    cached = [v for mod in m.modules() for v in getattr(mod, "attention_bias_cache", {}).values()]
    assert all(type(v) is torch.Tensor for v in cached)  # no fx Proxy left behind
    second = l2c(m, x)
    assert [s.reason for s in first.sites] == [s.reason for s in second.sites] and first.sites
    assert second.validation.passed


def test_hf_resnet_output_class_is_rebuilt_exactly():
    cfg = transformers.ResNetConfig(num_labels=4, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                    layer_type="basic")  # fmt: skip
    torch.manual_seed(0)
    m = transformers.ResNetForImageClassification(cfg).eval()
    x = torch.randn(2, 3, 32, 32)
    for surgery in (l2c, c2l):
        res = surgery(m, x)
        out = res.module(x)
        assert type(out) is transformers.modeling_outputs.ImageClassifierOutputWithNoAttention
        torch.testing.assert_close(out.logits, m(x).logits, rtol=1e-4, atol=1e-5)
        assert res.rewritten, res.summary()
