"""The one comparison policy: magnitude-scaled tolerance by output dtype, NaN and inf in the same places, exact
integers; the ONNX cross-check uses it too."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import fxsurgery
from fxsurgery.verify import policy

NAN, INF = float("nan"), float("inf")


def test_tolerance_is_scaled_by_the_output_magnitude():
    ref = torch.tensor([100.0, -50.0])
    ok = policy.compare_outputs(ref, ref + 5e-3, rtol=1e-4)  # 5e-3 <= 1e-4 * 100
    assert not ok.failure and 0 < ok.max_rel <= 1e-4
    bad = policy.compare_outputs(ref, ref + 2e-2, rtol=1e-4)
    assert "exceeds" in bad.failure
    shape = policy.compare_outputs(ref, ref[:1])
    assert "original gives (2,)" in shape.failure


def test_tolerance_follows_the_output_dtype():
    for dtype, rtol in policy.RTOL.items():
        assert policy.tolerance(dtype) == rtol
    assert policy.tolerance(torch.int64) == 0.0 and policy.tolerance(torch.float32, 0.5) == 0.5
    ints = policy.compare_outputs(torch.tensor([1, 2]), torch.tensor([1, 3]))
    assert ints.failure


@pytest.mark.parametrize(
    "ref, got, passes",
    [
        ([NAN, 1.0], [NAN, 1.0], True),  # NaN in the same place: the original computes it too
        ([1.0, 2.0], [1.0, NAN], False),  # NaN where the original has a number
        ([1.0, NAN], [1.0, 2.0], False),  # a number where the original has NaN
        ([INF, 1.0], [INF, 1.0], True),
        ([INF, 1.0], [1e30, 1.0], False),  # inf in the reference must not hide a difference
        ([INF, 1.0], [-INF, 1.0], False),
        ([INF, 1.0], [INF, 1.5], False),  # the finite elements are still compared
    ],
)
def test_nan_and_inf_must_stand_in_the_same_places(ref, got, passes):
    result = policy.compare_outputs(torch.tensor(ref), torch.tensor(got))
    assert (not result.failure) is passes, result
    leaves = policy.compare_leaves([torch.tensor(ref)], [torch.tensor(got).numpy()])
    assert (not leaves.failure) is passes, leaves


def test_complex_outputs_are_compared_by_modulus():
    ref = torch.tensor([1 + 1j, 2 - 1j], dtype=torch.complex64)
    assert not policy.compare_outputs(ref, ref + 1e-6).failure
    assert policy.compare_outputs(ref, ref + 1e-6j * 1e3).failure


class _NanAt(nn.Module):
    """A Linear whose output holds a NaN at one place: what a broken rewrite could export."""

    def __init__(self, linear):
        super().__init__()
        self.linear = linear

    def forward(self, x):
        y = self.linear(x)
        index = torch.arange(y.shape[1]).expand_as(y)
        return torch.where(index == 1, torch.full_like(y, NAN), y)


def test_the_onnx_cross_check_fails_a_nan_the_original_does_not_have(tmp_path):
    original = nn.Linear(4, 3).eval()
    check = fxsurgery.cross_check(original, _NanAt(original), torch.randn(2, 4), tmp_path, exporter="torchscript")
    assert not check.passed
    assert any("NaN" in f for f in check.failures), check.failures
    assert all(math.isinf(c.max_abs_error) for c in check.comparisons if c.candidate.startswith("torch rewritten"))


class _Layer:
    def __init__(self, keys):
        self.keys, self.ready = keys, True


class _Cache:  # an output object compared by identity, like a HuggingFace DynamicCache
    def __init__(self, keys):
        self.layers = [_Layer(k) for k in keys]


def test_objects_without_equality_are_compared_attribute_by_attribute():
    from fxsurgery.verify.policy import compare_outputs

    a = torch.randn(2, 3)
    same = compare_outputs((a, _Cache([a, a + 1])), (a.clone(), _Cache([a.clone(), a + 1])))
    assert not same.failure
    off = compare_outputs((a, _Cache([a, a + 1])), (a.clone(), _Cache([a.clone(), a + 2])))
    assert "_Cache" in off.failure and "exceeds" in off.failure
