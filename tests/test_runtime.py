"""The functions rewritten graphs call (fxsurgery._runtime), against NumPy float64 references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fxsurgery import _runtime
from tests import reference


def test_check_spatial_size_passes_the_traced_size_and_names_the_site_otherwise():
    x = torch.randn(2, 3, 4, 5)
    assert _runtime.check_spatial_size(x, (4, 5), "fc") is x
    with pytest.raises(RuntimeError, match="site 'fc' was rewritten for a 4x5 feature map but got 6x5; the original"):
        _runtime.check_spatial_size(torch.randn(2, 3, 6, 5), (4, 5), "fc")
    with pytest.raises(RuntimeError, match="rewrite again with example inputs of this size"):
        _runtime.check_spatial_size(torch.randn(2, 3, 6, 5), (4, 5), "conv", original_rejects=False)


@pytest.mark.parametrize("norm", [_runtime.layer_norm_channels, _runtime.layer_norm_moved])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("shape", [(2, 6, 3, 4), (2, 6, 1, 7), (3, 6, 1, 1), (2, 6, 5)])
def test_layer_norm_channels_is_a_layer_norm_over_dim_1(shape, affine, norm):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape) * 3 + 1
    w, b = (rng.standard_normal(shape[1]), rng.standard_normal(shape[1])) if affine else (None, None)
    got = norm(torch.from_numpy(x), *(None if t is None else torch.from_numpy(t) for t in (w, b)), 1e-5)
    np.testing.assert_allclose(got.numpy(), reference.layer_norm(x, 1, w, b, 1e-5), rtol=0, atol=1e-12)


@pytest.mark.parametrize("padded, window, shift", [((8, 8), (4, 4), (2, 2)), ((6, 9), (3, 3), (1, 2))])
def test_shift_mask(padded, window, shift):
    got = _runtime.shift_mask(torch.zeros(padded, dtype=torch.float64), window, list(shift))
    np.testing.assert_array_equal(got.numpy(), reference.shift_mask(padded, window, shift))


CASES = {
    "v1 shifted, padded": dict(hw=(6, 7), window=(4, 4), shift=(2, 2), v2=False),
    "v1 no shift": dict(hw=(8, 8), window=(4, 4), shift=(0, 0), v2=False),
    "v2 cosine, shifted": dict(hw=(8, 8), window=(4, 4), shift=(2, 2), v2=True),
    "window larger than the map": dict(hw=(3, 3), window=(4, 4), shift=(2, 2), v2=False),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_window_attention_nchw_matches_the_numpy_reference(case):
    p = CASES[case]
    rng = np.random.default_rng(1)
    b, c, heads = 2, 8, 2
    (h, w), window, shift = p["hw"], p["window"], p["shift"]
    s = window[0] * window[1]
    x = rng.standard_normal((b, h, w, c))
    qkv_w, qkv_b = rng.standard_normal((3 * c, c)) * 0.3, rng.standard_normal(3 * c)
    proj_w, proj_b = rng.standard_normal((c, c)) * 0.3, rng.standard_normal(c)
    rel_bias = rng.standard_normal((1, heads, s, s))
    logit_scale = np.log(10 * rng.random((heads, 1, 1)) + 1) if p["v2"] else None
    expected = reference.window_attention(x, qkv_w, proj_w, rel_bias, window, heads, shift, qkv_b, proj_b,
                                          logit_scale)  # fmt: skip
    t = torch.from_numpy
    got = _runtime.window_attention_nchw(
        t(x).permute(0, 3, 1, 2), t(qkv_w).view(3 * c, c, 1, 1), t(proj_w).view(c, c, 1, 1), t(rel_bias),
        list(window), heads, list(shift), 0.0, 0.0, t(qkv_b), t(proj_b),
        None if logit_scale is None else t(logit_scale), training=False,
    )  # fmt: skip
    assert got.shape == (b, c, h, w)
    np.testing.assert_allclose(got.permute(0, 2, 3, 1).numpy(), expected, rtol=0, atol=1e-10)
