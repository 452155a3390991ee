"""A model that draws random numbers in its forward cannot be validated: the error says so, not "a site is wrong" or
"please report the model"."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxsurgery


class RandomMasking(nn.Module):
    """ViTMAE's masking: a random subset of the tokens, drawn at every call."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):  # (B, S, C)
        keep = torch.rand(x.shape[0], x.shape[1]).argsort(dim=1)[:, :4]
        return self.fc(torch.gather(x, 1, keep[..., None].expand(-1, -1, x.shape[2])))


class FixedNoise(RandomMasking):
    def forward(self, x, noise):
        keep = noise.argsort(dim=1)[:, :4]
        return self.fc(torch.gather(x, 1, keep[..., None].expand(-1, -1, x.shape[2])))


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_a_model_with_random_outputs_is_refused_with_why(frontend):
    x = torch.randn(2, 6, 8)
    with pytest.raises(fxsurgery.InputError, match=r"RandomMasking gives other outputs each time .* draws random"):
        fxsurgery.linear_to_conv(RandomMasking(), x, token_layout=True, frontend=frontend)


def test_the_same_model_with_its_noise_as_an_input_is_rewritten():
    x, noise = torch.randn(2, 6, 8), torch.rand(2, 6)
    model = FixedNoise().eval()
    res = fxsurgery.linear_to_conv(model, (x, noise), token_layout=True, precision="float64")
    assert [s.name for s in res.rewritten] == ["fc"] and res.validation.max_rel_error < 1e-12


def test_a_deterministic_model_with_a_wrong_rewrite_is_still_blamed_on_the_site():
    """The check runs only on a failed validation, and a deterministic model's failure keeps its culprit."""
    from fxsurgery.models import demo_model
    from tests.verify.test_validation import _rules_with_wrong_head_mapping

    with pytest.raises(fxsurgery.ValidationError) as info:
        fxsurgery.linear_to_conv(demo_model(), torch.randn(2, 3, 32, 32),
                                 rules=_rules_with_wrong_head_mapping())  # fmt: skip
    assert info.value.sites == ("classifier.1",)
