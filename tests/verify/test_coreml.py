"""The Core ML op census (optional: coremltools converts on Linux): a stack of Llama blocks rewritten with the
token layout keeps its convs through Core ML's conversion and has no transpose inside or between the blocks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxsurgery
from fxsurgery.runtimes.coreml import op_census
from tests.rules.linear_to_conv.test_decoder import LlamaBlock

pytest.importorskip("coremltools", reason='Core ML is optional: pip install "fxsurgery[coreml]"')


class Block32(LlamaBlock):
    """The block with RMSNorm's upcast to float32, as transformers writes it (Core ML computes in float32/16)."""

    def rms(self, x, w):
        h = x.to(torch.float32)
        return w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6))


def test_llama_blocks_have_no_transpose_in_core_ml_after_the_rewrite():
    torch.manual_seed(0)
    model = nn.Sequential(Block32(), Block32()).eval().float()
    x = torch.randn(1, 6, 16)
    res = fxsurgery.linear_to_conv(model, x, token_layout=True)
    assert len(res.rewritten) == 14 and res.validation.passed
    before, after = op_census(model, (x,)), op_census(res.module, (x,))
    assert before["linear"] == 14 and "conv" not in before and before["transpose"] >= 2 * 4  # q, k, v, out per block
    assert after["conv"] == 14 and "linear" not in after
    assert after["transpose"] == 2  # the tokens into (B, C, 1, S) and back out, once for both blocks
