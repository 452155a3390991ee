"""window-attention (token_layout=True): torchvision's Swin block with its window attention on NCHW, qkv/proj as
1x1 convs, exact in float64 against torchvision's own implementation (and tests/test_runtime.py holds the NumPy
reference of the function it calls)."""

from __future__ import annotations

import torch
from torch import nn

from tests.conftest import run_surgery


def _block():
    from torchvision.models.swin_transformer import SwinTransformerBlock

    torch.manual_seed(0)
    return SwinTransformerBlock(dim=16, num_heads=2, window_size=[4, 4], shift_size=[2, 2]).eval()


def test_swin_block_rewritten_exactly():
    x = torch.randn(2, 8, 8, 16)
    names = ["attn.qkv", "attn.proj", "mlp.0", "mlp.3"]
    res = run_surgery("linear_to_conv", _block(), x, rewritten=names, token_layout=True)
    patterns = {s.name: s.pattern for s in res.sites}
    assert patterns["attn.qkv"] == patterns["attn.proj"] == "window-attention"
    assert isinstance(res.module.get_submodule("attn.qkv"), nn.Conv2d)


def test_excluding_the_qkv_linear_keeps_the_window_attention():
    res = run_surgery("linear_to_conv", _block(), torch.randn(2, 8, 8, 16), rewritten=["mlp.0", "mlp.3"],
                      token_layout=True, exclude=["attn.qkv"],
                      skipped={"attn.qkv": "excluded by the caller", "attn.proj": "reads its weight"})  # fmt: skip
    assert not any(isinstance(m, nn.Conv2d) for n, m in res.module.named_modules() if n.startswith("attn"))
