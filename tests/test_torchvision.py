"""Real architectures from torchvision (random weights, no downloads), both directions.

The default run samples a handful of models; ``pytest -m slow`` runs the whole classification zoo (the coverage
script, ``python -m benchmarks.coverage``, produces the committed table). Expected counts are written here or
computed by inspecting the model's layers, never read back from the tool.
"""

from __future__ import annotations

import pytest
import torch
import torchvision  # a test-only dependency: the README's test command installs it (torch 2.14.1 + torchvision 0.29.1)
from torch import nn

import fxsurgery
from fxsurgery.rules import UNSEEN


def pointwise_convs(model: nn.Module) -> int:
    """1x1 Conv2d layers with groups 1 and no padding that run in eval mode: what conv_to_linear must rewrite."""
    aux = {id(m) for name in ("aux1", "aux2", "AuxLogits") if getattr(model, name, None) is not None
           for m in getattr(model, name).modules()}  # fmt: skip
    return sum(
        isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.groups == 1 and tuple(m.padding) == (0, 0)
        for m in model.modules()
        if id(m) not in aux
    )


def linears(model: nn.Module) -> int:
    return sum(isinstance(m, nn.Linear) for m in model.modules())


# model: (Linear layers rewritten to conv, pointwise convs rewritten to Linear), None = count by inspection
SAMPLE = {
    "resnet18": (1, 3),  # fc; the three strided downsample convs
    "alexnet": (3, 0),  # flatten -> Dropout -> Linear chain
    "squeezenet1_1": (0, 17),  # no Linear; 8 squeeze + 8 expand1x1 + the final classifier conv
    "mobilenet_v3_small": (2, None),
    "shufflenet_v2_x0_5": (1, None),
    "googlenet": (1, None),  # flatten -> Dropout -> fc (the aux heads do not run in eval mode)
    "regnet_x_400mf": (1, None),
    "mnasnet0_5": (1, None),  # mean([2, 3]) -> Dropout -> Linear
}
#: The auxiliary classifiers of a model, which do not run in eval mode.
AUX = {"googlenet": ("aux1", "aux2")}
AUX = {name: AUX.get(name, ()) for name in SAMPLE}


def build(name: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    return model, torch.randn(2, 3, 224, 224)


@pytest.mark.parametrize("name", sorted(SAMPLE))
def test_sampled_models_both_directions(name):
    model, x = build(name)
    to_conv, to_linear = SAMPLE[name]
    if name != "googlenet":
        assert linears(model) == to_conv  # every Linear of these CNNs is in the classifier head
    res = fxsurgery.linear_to_conv(model, x, num_random=1)
    assert len(res.rewritten) == to_conv, res.summary()
    # GoogLeNet's auxiliary classifiers do not run in eval mode: listed, with why
    assert {s.name: s.reason for s in res.skipped} == {f"{a}.{fc}": UNSEEN for a in AUX[name] for fc in ("fc1", "fc2")}
    expected = pointwise_convs(model) if to_linear is None else to_linear
    assert pointwise_convs(model) == expected
    res = fxsurgery.conv_to_linear(model, x, num_random=1)
    assert len(res.rewritten) == expected and not res.skipped, res.summary()
    assert res.validation.passed and 2 in res.validation.batch_sizes


@pytest.mark.slow  # the ONNX cross-check of CNNs runs in the coverage table and the conversion matrix too
def test_resnet18_onnx_cross_check(tmp_path):
    model, x = build("resnet18")
    for to in ("conv", "linear"):
        report = fxsurgery.check(model, x, to, tmp_path / to, num_random=1)
        assert report.passed, report.summary()
        assert report.onnx.rewrite_visible


def test_vit_token_linears_are_skipped_with_reasons():
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32,
                                                 mlp_dim=64, num_classes=10).eval()  # fmt: skip
    res = fxsurgery.linear_to_conv(model, torch.randn(2, 3, 32, 32))
    assert not res.rewritten and res.validation.passed
    reasons = {s.name: s.reason for s in res.skipped}
    attention = {n: r for n, r in reasons.items() if n.endswith("out_proj")}
    assert len(attention) == 2 and all("(MultiheadAttention), which the graph calls as one layer" in r
                                       for r in attention.values()), res.summary()  # fmt: skip
    others = [r for n, r in reasons.items() if n not in attention]
    assert all("tokens" in r or "not a flattened" in r for r in others), res.summary()


@pytest.mark.slow
def test_whole_zoo(tmp_path):
    from benchmarks.coverage import all_models, run_one

    failures = []
    for name in all_models():
        for to in ("conv", "linear"):
            record = run_one(name, to, onnx=True)
            if not record.get("passed"):
                failures.append((name, to, record.get("outcome"), record.get("error") or record.get("onnx_detail")))
    assert not failures, failures
