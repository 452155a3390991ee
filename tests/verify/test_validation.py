"""Validation catches wrong rewrites and names the site; the tolerance policy is what the README says."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import fxsurgery
from fxsurgery.models import demo_model
from fxsurgery.report import HISTOGRAM_BINS
from fxsurgery.rules import linear_to_conv
from fxsurgery.rules.linear_to_conv.flatten_head import FlattenHead
from fxsurgery.verify import policy
from fxsurgery.verify.validation import validate


def _wrong_mapping(weight, feature_shape, flatten_order=None):
    """A plausible-looking but wrong mapping: kernel laid out (O, H, W, C) instead of (O, C, H, W)."""
    c, h, w = feature_shape
    return weight.view(weight.shape[0], h, w, c).permute(0, 3, 1, 2)


def _rules_with_wrong_head_mapping() -> fxsurgery.RuleSet:
    """The direction's own rule set, with the flatten-head rule given a wrong weight mapping."""
    rules = linear_to_conv.rule_set()
    swapped = tuple(FlattenHead(weight_map=_wrong_mapping) if isinstance(r, FlattenHead) else r for r in rules.rules)
    return dataclasses.replace(rules, rules=swapped)


def test_wrong_weight_mapping_raises_naming_the_site():
    with pytest.raises(fxsurgery.ValidationError) as info:
        fxsurgery.linear_to_conv(demo_model(), torch.randn(2, 3, 32, 32), rules=_rules_with_wrong_head_mapping())
    err = info.value
    assert err.sites == ("classifier.1",)  # the 4x4 site; the 1x1 sites are unaffected by the layout mistake
    assert "classifier.1" in str(err)
    assert not err.result.validation.passed and err.result.validation.max_rel_error > 1e-2


def test_validation_false_skips_it():
    res = fxsurgery.linear_to_conv(demo_model(), torch.randn(2, 3, 32, 32), validate=False)
    assert res.validation is None and res.passed


def test_float64_proof_is_exact():
    res = fxsurgery.linear_to_conv(demo_model(), torch.randn(2, 3, 32, 32), precision="float64")
    v = res.validation
    assert v.precision == "float64" and v.rtol == 1e-10 and v.max_rel_error < 1e-13
    assert v.batch_sizes == (1, 2, 3) and v.num_inputs == 5  # batch 1: the lowest a traced graph may admit


def test_fp32_large_k_is_within_policy_but_above_per_element_defaults():
    """Linear vs 7x7 conv at K = 25088 in float32: passes the magnitude-scaled policy."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(512 * 7 * 7, 64)).eval()
    x = torch.randn(2, 512, 7, 7) * 3
    res = fxsurgery.linear_to_conv(model, x)
    assert res.validation.passed and 0 < res.validation.max_rel_error < policy.RTOL[torch.float32]


def test_validate_reports_batch_axis_not_free():
    class FixedBatch(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 2)

        def forward(self, x):
            return self.fc(x.reshape(2, 8))

    res = fxsurgery.linear_to_conv(FixedBatch(), torch.randn(2, 2, 2, 2))
    assert res.validation.batch_sizes == (2,)
    assert any("batch axis is not free" in n for n in res.validation.notes)
    assert res.skipped[0].reason.startswith("reshape: the reshape hard-codes the batch size")


def test_random_padding_masks_stay_padding_masks():
    from fxsurgery.verify.validation import random_inputs

    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    ids = torch.tensor([[5, 0, 3, 1], [2, 2, 7, 1]])
    for seed in range(20):
        new_ids, new_mask = random_inputs((ids, mask), torch.Generator().manual_seed(seed), batch=5)
        assert new_mask.shape == (5, 4) and new_mask.dtype == mask.dtype
        assert (new_mask[:, 0] == 1).all() and (new_mask[:, 1:] <= new_mask[:, :-1]).all()  # never all masked
        assert new_ids.min() >= 0 and new_ids.max() <= 7
    many = torch.cat([random_inputs((ids,), torch.Generator().manual_seed(s), batch=8)[0] for s in range(10)])
    assert len(many.unique()) == 8  # other integers stay uniform over their range


class _Scaled(nn.Module):
    def __init__(self, factor):
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return x * self.factor


def test_error_histograms_count_every_element_by_decade_of_its_error():
    """|got - ref| / output scale per element, pooled over the validation inputs: x against x * (1 + 1e-9) puts every
    element at or below 1e-9 (the largest |x| exactly there), none above; x against 2x puts the largest at 1."""
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    bins = list(HISTOGRAM_BINS)
    near = validate(_Scaled(1.0), _Scaled(1.0 + 1e-9), (x,), num_random=1)
    counts = near.error_histograms["output"]
    elements = sum(counts)
    assert elements >= 2 * x.numel()  # the example and a random input, and another batch size
    assert counts[bins.index("1e-10..1e-9")] + counts[bins.index("1e-9..1e-8")] >= 1
    assert sum(counts[bins.index("1e-8..1e-7") :]) == 0
    far = validate(_Scaled(1.0), _Scaled(2.0), (x,), num_random=1)
    assert not far.passed and far.error_histograms["output"][bins.index(">=1")] >= 1
    assert sum(far.error_histograms["output"]) == elements  # the same inputs, every element counted once
    assert validate(_Scaled(1.0), _Scaled(1.0), (x,), num_random=1).error_histograms["output"][0] == elements


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_the_culprit_search_rewrites_from_the_graph_already_captured(frontend, monkeypatch):
    """Naming the site takes several rewrites with sites left out; none of them traces or exports the model again."""
    from fxsurgery import pipeline

    calls = {"trace": 0, "export": 0}
    trace, export = pipeline.trace, pipeline.export_model

    def counted_trace(*args, **kwargs):
        calls["trace"] += 1
        return trace(*args, **kwargs)

    def counted_export(*args, **kwargs):
        calls["export"] += 1
        return export(*args, **kwargs)

    monkeypatch.setattr(pipeline, "trace", counted_trace)
    monkeypatch.setattr(pipeline, "export_model", counted_export)
    with pytest.raises(fxsurgery.ValidationError) as info:
        fxsurgery.linear_to_conv(
            demo_model(), torch.randn(2, 3, 32, 32), rules=_rules_with_wrong_head_mapping(), frontend=frontend
        )
    assert info.value.sites == ("classifier.1",)
    assert calls == ({"trace": 1, "export": 0} if frontend == "fx" else {"trace": 0, "export": 1}), calls


def _deep_half(dtype: torch.dtype) -> nn.Module:
    """24 Linear + LayerNorm + GELU layers after a flattened head: half-precision rounding compounds past the type's
    tolerance (the original against its own float32 run: ~3e-3 of the scale in float16)."""
    torch.manual_seed(0)
    layers = [m for _ in range(24) for m in (nn.Linear(256, 256), nn.LayerNorm(256), nn.GELU())]
    return nn.Sequential(nn.Flatten(), nn.Linear(768, 256), *layers).to(dtype).eval()


def test_a_deep_half_precision_model_is_compared_within_its_own_rounding_and_a_wrong_mapping_still_fails():
    model, x = _deep_half(torch.float16), torch.randn(2, 3, 16, 16).half()
    res = fxsurgery.linear_to_conv(model, x)
    v = res.validation
    assert v.passed and policy.RTOL[torch.float16] < v.rtol < policy.HALF_CAP, v
    assert any("a float16 model: outputs compared to" in n for n in v.notes), v.notes
    with pytest.raises(fxsurgery.ValidationError) as info:  # off by the output's magnitude, far past any widening
        fxsurgery.linear_to_conv(model, x, rules=_rules_with_wrong_head_mapping())
    assert info.value.sites == ("1",) and info.value.result.validation.max_rel_error > policy.HALF_CAP
    with pytest.raises(fxsurgery.ValidationError):  # an rtol given is the tolerance: nothing widens it
        fxsurgery.linear_to_conv(model, x, rtol=policy.RTOL[torch.float16])


def test_the_half_tolerance_is_three_times_the_originals_own_error_below_its_cap():
    want = torch.linspace(-1, 1, 9, dtype=torch.float64)  # the float32 run (values exact in bfloat16)
    ref = (want + 2**-6).bfloat16()  # the original: 1.6e-2 of the scale from it
    assert policy.half_tolerance(ref, ref, torch.bfloat16, lambda: want) == (None, "")  # passes as it is
    tol, note = policy.half_tolerance(ref, ref + 0.04, torch.bfloat16, lambda: want.float())
    assert tol == 3 * 2**-6 and "three times the original's own error" in note
    assert not policy.compare_outputs(ref, ref + 0.04, rtol=tol).failure
    assert policy.compare_outputs(ref, -ref, rtol=tol).failure  # a wrong result errs by the magnitude
    far = (want + 2**-4).bfloat16()  # 3 x 6e-2 is past the cap: the type's tolerance stands
    assert policy.half_tolerance(far, far + 0.05, torch.bfloat16, lambda: want) == (None, "")


def test_full_float32_turns_tf32_off_while_it_runs_and_puts_the_settings_back():
    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    before = conv.fp32_precision, matmul.fp32_precision
    try:
        conv.fp32_precision, matmul.fp32_precision = "tf32", "tf32"
        with pytest.raises(RuntimeError, match="inside"), policy.full_float32():
            assert conv.fp32_precision == matmul.fp32_precision == "ieee"
            raise RuntimeError("inside")
        assert (conv.fp32_precision, matmul.fp32_precision) == ("tf32", "tf32")
    finally:
        conv.fp32_precision, matmul.fp32_precision = before
