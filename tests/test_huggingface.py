"""HuggingFace models, built from small configs with random weights (no hub access) and called as users call them:
no crash, the original's output class, validation exact in float64, and with ``token_layout=True`` every Linear of
the attention and MLP blocks rewritten."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import fxsurgery

T = pytest.importorskip("transformers")


def _ids(n: int = 2, s: int = 8) -> torch.Tensor:
    return torch.randint(0, 100, (n, s))


def _mask() -> torch.Tensor:
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[0, 5:] = 0
    return mask


# name: (model factory, example inputs, pattern of the Linear layers inside attention and MLP blocks)
FAMILIES = {
    "bert": (lambda: T.BertForSequenceClassification(T.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        num_labels=3)), lambda: (_ids(), {"attention_mask": _mask()}), r"encoder\.layer\.\d+\."),
    "vit": (lambda: T.ViTForImageClassification(T.ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, num_labels=5)), lambda: (torch.randn(2, 3, 32, 32),), r"layers?\.\d+\."),
    "whisper-encoder": (lambda: T.WhisperForAudioClassification(T.WhisperConfig(
        d_model=32, encoder_layers=2, decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=16, max_source_positions=16, num_labels=3)),
        lambda: (torch.randn(2, 16, 32),), r"encoder\.layers\.\d+\."),
    "segformer": (lambda: T.SegformerForSemanticSegmentation(T.SegformerConfig(
        num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[8, 16], num_attention_heads=[1, 2],
        decoder_hidden_size=16, num_labels=3)), lambda: (torch.randn(2, 3, 32, 32),), r"stages\.\d+\.blocks\."),
    "gpt2": (lambda: T.GPT2LMHeadModel(T.GPT2Config(
        n_layer=2, n_embd=32, n_head=4, vocab_size=100, n_positions=64, bos_token_id=0, eos_token_id=0)),
        lambda: (_ids(), {"attention_mask": _mask()}), r"h\.\d+\."),
    "llama": (lambda: T.LlamaForCausalLM(T.LlamaConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64)), lambda: (_ids(),), r"layers\.\d+\."),
}  # fmt: skip


def _linears_in_blocks(model: nn.Module, pattern: str) -> set[str]:
    """The Linear layers (GPT-2's Conv1D, a Linear with a transposed weight, included) of the blocks."""
    linear = (nn.Linear, T.pytorch_utils.Conv1D)
    return {n for n, m in model.named_modules() if isinstance(m, linear) and re.search(pattern, n)}


def _call(model, inputs):
    *args, kwargs = inputs if isinstance(inputs[-1], dict) else (*inputs, {})
    return model(*args, **kwargs)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_token_layout_rewrites_every_linear_of_the_blocks(family):
    make, inputs, blocks = FAMILIES[family]
    torch.manual_seed(0)
    model, x = make().eval(), inputs()
    res = fxsurgery.linear_to_conv(model, x, token_layout=True, precision="float64")
    wanted = _linears_in_blocks(model, blocks)
    assert wanted and wanted <= {s.name for s in res.rewritten}, res.summary()
    assert res.validation.passed and res.validation.max_rel_error < 1e-12
    for s in res.skipped:
        assert s.reason and "internal error" not in s.reason
    out, expected = _call(res.module, x), _call(model, x)
    assert type(out) is type(expected)
    ref = expected[0] if not isinstance(expected, torch.Tensor) else expected
    got = out[0] if not isinstance(out, torch.Tensor) else out
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["vit", "segformer"])
def test_the_default_modes_never_break_the_model(family):
    make, inputs, _ = FAMILIES[family]
    torch.manual_seed(0)
    model, x = make().eval(), inputs()
    for surgery in (fxsurgery.linear_to_conv, fxsurgery.conv_to_linear):
        res = surgery(model, x)
        assert res.validation.passed
        assert type(_call(res.module, x)) is type(_call(model, x))


def test_a_padding_mask_changes_the_output_and_the_rewrite_follows_it():
    make, inputs, _ = FAMILIES["bert"]
    torch.manual_seed(0)
    model = make().eval()
    ids, kw = inputs()
    res = fxsurgery.linear_to_conv(model, (ids, kw), token_layout=True)
    full = torch.ones_like(kw["attention_mask"])
    masked, unmasked = res.module(ids, attention_mask=kw["attention_mask"]), res.module(ids, full)
    assert not torch.allclose(masked.logits, unmasked.logits)  # the mask is an input of the rewritten graph
    torch.testing.assert_close(masked.logits, model(ids, attention_mask=kw["attention_mask"]).logits)
    torch.testing.assert_close(unmasked.logits, model(ids, attention_mask=full).logits)


def test_gpt2_conv1d_weights_are_transposed_views_and_checkpoints_round_trip():
    make, inputs, _ = FAMILIES["gpt2"]
    torch.manual_seed(0)
    model, x = make().eval(), inputs()
    res = fxsurgery.linear_to_conv(model, x, token_layout=True)
    conv = res.module.get_submodule("transformer.h.0.attn.c_attn")
    original = model.transformer.h[0].attn.c_attn.weight  # (in, out)
    assert isinstance(conv, nn.Conv2d) and conv.weight.shape == (96, 32, 1, 1)
    assert conv.weight.data_ptr() == original.data_ptr()  # a view of the transposed weight, no copy
    state = fxsurgery.original_state_dict(res.module)
    for key, value in model.state_dict().items():
        if key in state:
            assert torch.equal(state[key], value), key
    assert {s.name: s.reason for s in res.skipped}["lm_head"] == "weight shared with transformer.wte (tied weights)"


def test_segformer_pointwise_convs_become_linears():
    make, inputs, _ = FAMILIES["segformer"]
    torch.manual_seed(0)
    model, x = make().eval(), inputs()
    res = fxsurgery.conv_to_linear(model, x, precision="float64")
    pointwise = {n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)}
    assert pointwise and pointwise <= {s.name for s in res.rewritten}, res.summary()
    assert res.frontend == "export" and res.validation.max_rel_error < 1e-12
