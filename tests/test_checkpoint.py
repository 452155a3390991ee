"""Checkpoints cross the rewrite both ways, bit-identically, in memory and through safetensors files."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import fxsurgery
from fxsurgery.engine.weights import conv_to_linear_weight, conv_transpose_to_linear_weight, linear_to_conv_weight
from fxsurgery.models import NetworkInNetwork, NiNClassifier


class NHWCHead(nn.Module):
    """A flatten of a channels-last map: the rewritten kernel is a permuted view, the hardest layout to invert."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 3 * 3, 6)
        self.up = nn.ConvTranspose2d(4, 5, 1)

    def forward(self, x):
        y = self.conv(x)
        return self.fc(y.permute(0, 2, 3, 1).flatten(1)), self.up(y)


MODELS = {
    "nin-classifier": (NiNClassifier, (2, 3, 32, 32)),
    "network-in-network": (lambda: NetworkInNetwork(16), (2, 3, 8, 8)),
    "nhwc-head": (NHWCHead, (2, 3, 3, 3)),
}


def _random_checkpoint(model: nn.Module) -> dict[str, torch.Tensor]:
    """A checkpoint 'trained on the original': same names and shapes, different values."""
    gen = torch.Generator().manual_seed(123)
    out = {}
    for k, v in model.state_dict().items():
        r = torch.randn(v.shape, generator=gen).to(v.dtype) if v.is_floating_point() else v.clone()
        out[k] = r.abs() + 0.5 if k.endswith("running_var") else r
    return out


@pytest.mark.parametrize(
    "name, direction",
    [("nin-classifier", "linear_to_conv"), ("nin-classifier", "conv_to_linear"), ("network-in-network", "conv_to_linear"),
     ("nhwc-head", "linear_to_conv"), ("nhwc-head", "conv_to_linear")],
)  # fmt: skip
def test_round_trip_bit_identical(name, direction, tmp_path):
    make, shape = MODELS[name]
    torch.manual_seed(0)
    original = make().eval()
    x = torch.randn(shape)
    res = fxsurgery.rewrite(original, x, direction)
    assert res.rewritten, res.summary()
    rewritten = res.module

    ckpt = _random_checkpoint(original)
    fxsurgery.load_state_dict(rewritten, ckpt)
    # the rewritten model now computes what the original computes with that checkpoint
    reference = make().eval()
    reference.load_state_dict(ckpt)
    with torch.no_grad():
        torch.testing.assert_close(rewritten(x), reference(x), rtol=1e-4, atol=1e-5)
    back = fxsurgery.original_state_dict(rewritten)
    assert back.keys() == ckpt.keys()
    for k in ckpt:
        assert back[k].shape == ckpt[k].shape and torch.equal(back[k], ckpt[k]), k

    # and through safetensors files
    save_file(back, str(tmp_path / "original_format.safetensors"))
    fresh = fxsurgery.rewrite(make().eval(), x, direction, validate=False).module
    fxsurgery.load_state_dict(fresh, load_file(str(tmp_path / "original_format.safetensors")))
    for k, v in fxsurgery.original_state_dict(fresh).items():
        assert torch.equal(v, ckpt[k]), k


def test_rewritten_format_state_dict_loads_as_is():
    original = NiNClassifier().eval()
    res = fxsurgery.linear_to_conv(original, torch.randn(2, 3, 32, 32))
    own = {k: v.clone() for k, v in res.module.state_dict().items()}
    fxsurgery.load_state_dict(res.module, own)  # already rewritten shapes: loaded unchanged
    assert all(torch.equal(res.module.state_dict()[k], v) for k, v in own.items())


def test_mismatched_checkpoint_is_refused():
    res = fxsurgery.linear_to_conv(NiNClassifier().eval(), torch.randn(2, 3, 32, 32))
    with pytest.raises(RuntimeError, match="Missing key"):
        fxsurgery.load_state_dict(res.module, {"aux.weight": torch.zeros(10, 64)})


def test_weight_mappings_are_views():
    w = torch.randn(6, 4 * 3 * 2)
    assert linear_to_conv_weight(w, (4, 3, 2)).data_ptr() == w.data_ptr()
    assert linear_to_conv_weight(w, (4, 3, 2), (1, 2, 0)).data_ptr() == w.data_ptr()
    k = torch.randn(6, 4, 1, 1)
    assert conv_to_linear_weight(k).data_ptr() == k.data_ptr()
    t = torch.randn(4, 6, 1, 1)
    lin = conv_transpose_to_linear_weight(t)
    assert lin.shape == (6, 4) and lin.data_ptr() == t.data_ptr() and torch.equal(lin, t[:, :, 0, 0].T)
    with pytest.raises(ValueError, match="does not flatten"):
        linear_to_conv_weight(w, (5, 3, 2))
