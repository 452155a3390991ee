"""The opt-in token layout: tokens (B, S, C) carried as (B, C, 1, S), channels-last maps as NCHW, so every
Linear in a transformer block is a 1x1 conv and self-attention runs without transposing the activations.

Expected values come from the original model in float64 (``run_surgery``); torchvision's ViT zero-initialises its
head, so the tests give it random weights first (else every output is 0 and a comparison sees nothing).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxsurgery
from fxsurgery.engine.layers import ConvSelfAttention
from tests.conftest import run_surgery

torchvision = pytest.importorskip("torchvision")


def tiny_vit(layers: int = 2) -> nn.Module:
    m = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=layers, num_heads=2,
                                             hidden_dim=16, mlp_dim=32).eval()  # fmt: skip
    nn.init.normal_(m.heads.head.weight)
    return m


def vit_block_sites(layers: int) -> list[str]:
    names = []
    for i in range(layers):
        block = f"encoder.layers.encoder_layer_{i}"
        names += [f"{block}.self_attention", f"{block}.self_attention.out_proj", f"{block}.mlp.0", f"{block}.mlp.3"]
    return names


def transposes(gm: torch.fx.GraphModule) -> int:
    return sum(n.op == "call_method" and n.target in ("transpose", "permute") for n in gm.graph.nodes)


def test_vit_every_block_linear_becomes_a_conv_with_one_transpose():
    model = tiny_vit(layers=3)
    res = run_surgery("linear_to_conv", model, torch.randn(2, 3, 32, 32), token_layout=True,
                      rewritten=vit_block_sites(3),
                      skipped={"heads.head": "not a flattened or pooled"})  # fmt: skip
    assert res.validation.max_rel_error < 1e-12
    gm = res.module
    # one region for the whole encoder: one conversion in, none out (the class token is read as alt[:, :, 0, 0]);
    # the model's own permute of the patch embedding stays
    assert transposes(gm) == transposes(torch.fx.symbolic_trace(model)) + 1
    assert not [n for n in gm.graph.nodes if n.op == "call_method" and n.target == "squeeze"]
    for i in range(3):
        attn = gm.get_submodule(f"encoder.layers.encoder_layer_{i}.self_attention")
        orig = model.get_submodule(f"encoder.layers.encoder_layer_{i}.self_attention")
        assert isinstance(attn, ConvSelfAttention)
        assert attn.in_proj_weight.shape == (48, 16, 1, 1)
        assert attn.in_proj_weight.data_ptr() == orig.in_proj_weight.data_ptr()  # a view, not a copy
        assert attn.out_proj.weight.data_ptr() == orig.out_proj.weight.data_ptr()
        mlp = gm.get_submodule(f"encoder.layers.encoder_layer_{i}.mlp.0")
        assert isinstance(mlp, nn.Conv2d) and mlp.kernel_size == (1, 1)


def test_vit_onnx_has_fewer_transposes_and_matches(tmp_path):
    model = tiny_vit()
    x = torch.randn(2, 3, 32, 32)
    res = fxsurgery.linear_to_conv(model, x, token_layout=True)
    check = fxsurgery.cross_check(model, res.module, x, tmp_path, direction=res.direction,
                                  rewritten_sites=len(res.rewritten))  # fmt: skip
    assert check, check.summary()
    before, after = check.op_counts["original"]["Transpose"], check.op_counts["rewritten"].get("Transpose", 0)
    # original: per block, MultiheadAttention's head split and merge; rewritten: q^T and the attention weights^T
    # per block, and one conversion into the layout
    assert after < before, (before, after)
    assert check.op_counts["rewritten"]["Conv"] == check.op_counts["original"]["Conv"] + 8


def test_tokens_are_left_alone_without_the_opt_in():
    model = tiny_vit()
    res = fxsurgery.linear_to_conv(model, torch.randn(2, 3, 32, 32))
    reasons = {s.name: s.reason for s in res.skipped}
    assert "token_layout=True" in reasons["encoder.layers.encoder_layer_0.mlp.0"]
    assert not res.rewritten
    assert "encoder.layers.encoder_layer_0.self_attention" not in reasons  # not a candidate without the opt-in


def test_vit_checkpoint_round_trip_through_the_attention_layer():
    model = tiny_vit()
    res = fxsurgery.linear_to_conv(model, torch.randn(2, 3, 32, 32), token_layout=True)
    back = fxsurgery.original_state_dict(res.module)
    for k, v in model.state_dict().items():
        assert torch.equal(back[k], v), k
    other = tiny_vit()
    fxsurgery.load_state_dict(res.module, other.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(res.module(x), other(x), rtol=1e-4, atol=1e-5)


class AttentionBlock(nn.Module):
    """A pre-norm transformer block built from torch.nn, with a choice of how attention is called."""

    def __init__(self, c: int = 16, heads: int = 2, call: str = "plain", **mha) -> None:
        super().__init__()
        self.call = call
        self.ln1, self.ln2 = nn.LayerNorm(c), nn.LayerNorm(c)
        self.attn = nn.MultiheadAttention(c, heads, batch_first=mha.pop("batch_first", True), **mha)
        self.fc1, self.fc2 = nn.Linear(c, 2 * c), nn.Linear(2 * c, c)
        self.register_buffer("mask", torch.triu(torch.ones(5, 5, dtype=torch.bool), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        if self.call == "mask":
            a = self.attn(h, h, h, attn_mask=self.mask, need_weights=False)[0]
        elif self.call == "weights":
            a, w = self.attn(h, h, h)
            a = a + w.mean() * 0
        elif self.call == "cross":
            a = self.attn(h, x, x, need_weights=False)[0]
        elif self.call == "seq-first":
            t = h.transpose(0, 1)
            a = self.attn(t, t, t)[0].transpose(0, 1)
        else:
            a, _ = self.attn(h, h, h, need_weights=False)
        x = x + a
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


def test_plain_attention_block_fully_rewritten():
    model = AttentionBlock().eval()
    run_surgery("linear_to_conv", model, torch.randn(3, 5, 16), token_layout=True,
                rewritten=["attn", "attn.out_proj", "fc1", "fc2"], skipped={})  # fmt: skip


@pytest.mark.parametrize("call, mha, reason", [
    ("mask", {}, "attention mask"),
    ("weights", {}, "attention weights it returns are used"),
    ("cross", {}, "not self-attention"),
    ("seq-first", {"batch_first": False}, "batch_first=False"),
    ("plain", {"add_bias_kv": True}, "add_bias_kv"),
])  # fmt: skip
def test_attention_that_is_not_plain_self_attention_is_skipped_with_its_reason(call, mha, reason):
    model = AttentionBlock(call=call, **mha).eval()
    run_surgery("linear_to_conv", model, torch.randn(3, 5, 16), token_layout=True,
                rewritten=["fc1", "fc2"], skipped={"attn": reason})  # fmt: skip


class MixerBlock(nn.Module):
    """MLP-Mixer: a token-mixing MLP (Linear over the sequence axis) and a channel-mixing MLP."""

    def __init__(self, s: int = 6, c: int = 8) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(c), nn.LayerNorm(c)
        self.tok1, self.tok2 = nn.Linear(s, 2 * s), nn.Linear(2 * s, s)
        self.ch1, self.ch2 = nn.Linear(c, 3 * c), nn.Linear(3 * c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln1(x).transpose(1, 2)
        x = x + self.tok2(F.gelu(self.tok1(y))).transpose(1, 2)
        return x + self.ch2(F.gelu(self.ch1(self.ln2(x))))


def test_mlp_mixer_block_both_mlps_become_convs():
    model = MixerBlock().eval()
    run_surgery("linear_to_conv", model, torch.randn(2, 6, 8), token_layout=True,
                rewritten=["tok1", "tok2", "ch1", "ch2"], skipped={})  # fmt: skip


def test_token_layout_must_be_a_bool():
    with pytest.raises(fxsurgery.InputError, match="token_layout"):
        fxsurgery.linear_to_conv(MixerBlock(), torch.randn(2, 6, 8), token_layout="yes")


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_swin_every_linear_becomes_a_conv_window_attention_included(version):
    swin = torchvision.models.swin_transformer
    extra = {"block": swin.SwinTransformerBlockV2, "downsample_layer": swin.PatchMergingV2} if version == "v2" else {}
    model = torchvision.models.SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 2],
                                               window_size=[4, 4], **extra).eval()  # fmt: skip
    nn.init.normal_(model.head.weight)
    linears = sorted(n for n, m in model.named_modules() if isinstance(m, nn.Linear))
    # v2's continuous position bias MLP reads a constant table (export folds it): skipped with that reason
    constant = [n for n in linears if ".cpb_mlp." in n]
    assert bool(constant) == (version == "v2")
    # the second block of each stage shifts its windows (8x8 map, 4x4 windows): the shift mask is exercised
    res = run_surgery("linear_to_conv", model, torch.randn(2, 3, 32, 32), token_layout=True,
                      rewritten=[n for n in linears if n not in constant],
                      skipped=dict.fromkeys(constant, "its input is a constant"))  # fmt: skip
    assert res.validation.max_rel_error < 1e-12
    patterns = {s.name: s.pattern for s in res.rewritten}
    assert patterns["features.1.1.attn.qkv"] == patterns["features.1.1.attn.proj"] == "window-attention"
    for name in (n for n in linears if n not in constant):
        conv = res.module.get_submodule(name)
        assert isinstance(conv, nn.Conv2d)
        assert conv.weight.data_ptr() == model.get_submodule(name).weight.data_ptr()


@pytest.mark.slow  # Swin's ONNX cross-check runs in the coverage table (benchmarks/coverage.md) too
def test_swin_onnx_cross_check(tmp_path):
    model = torchvision.models.SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 2],
                                               window_size=[4, 4]).eval()  # fmt: skip
    nn.init.normal_(model.head.weight)
    x = torch.randn(2, 3, 32, 32)
    res = fxsurgery.linear_to_conv(model, x, token_layout=True)
    check = fxsurgery.cross_check(model, res.module, x, tmp_path, direction=res.direction,
                                  rewritten_sites=len(res.rewritten))  # fmt: skip
    assert check, check.summary()
    assert check.op_counts["rewritten"].get("Transpose", 0) < check.op_counts["original"]["Transpose"]


class TinyBert(nn.Module):
    """A BERT-like encoder built from torch.nn's own TransformerEncoder."""

    def __init__(self, norm_first: bool) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 16)
        layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True, norm_first=norm_first, activation="gelu")
        self.encoder = nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(16), enable_nested_tensor=False)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.encoder(self.embed(x))[:, 0])


@pytest.mark.parametrize("norm_first", [True, False])
def test_torch_nn_transformer_encoder_is_traced_and_fully_rewritten(norm_first):
    model = TinyBert(norm_first).eval()
    blocks = [f"encoder.layers.{i}.{n}" for i in (0, 1)
              for n in ("self_attn", "self_attn.out_proj", "linear1", "linear2")]  # fmt: skip
    res = run_surgery("linear_to_conv", model, torch.randn(2, 5, 4), token_layout=True,
                      rewritten=["embed", *blocks], skipped={"head": "not a flattened or pooled"})  # fmt: skip
    assert transposes(res.module) == 1  # into the token layout once, at the input; the class token is read in place


def test_excluding_a_window_attention_by_its_qkv_name_keeps_it():
    model = torchvision.models.SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 2],
                                               window_size=[4, 4]).eval()  # fmt: skip
    nn.init.normal_(model.head.weight)
    linears = sorted(n for n, m in model.named_modules() if isinstance(m, nn.Linear))
    kept = {"features.1.1.attn.qkv", "features.1.1.attn.proj"}
    res = run_surgery("linear_to_conv", model, torch.randn(2, 3, 32, 32), token_layout=True,
                      exclude=["features.1.1.attn.qkv"], rewritten=[n for n in linears if n not in kept],
                      skipped={"features.1.1.attn.qkv": "excluded", "features.1.1.attn.proj": "reads its weight"})  # fmt: skip
    assert type(res.module.get_submodule("features.1.1.attn.qkv")) is not nn.Conv2d
