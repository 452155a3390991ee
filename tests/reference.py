"""NumPy float64 references, written without torch's kernels (as in the seed notebook)."""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


def linear(x: np.ndarray, w: np.ndarray, b: np.ndarray | None) -> np.ndarray:
    """y = x W^T + b over the last axis."""
    y = np.einsum("...k,ok->...o", x, w)
    return y if b is None else y + b


def conv2d(x: np.ndarray, w: np.ndarray, b: np.ndarray | None, stride: int = 1) -> np.ndarray:
    """Valid (unpadded) cross-correlation: x (N, C, H, W), w (O, C, kh, kw) -> (N, O, H', W')."""
    kh, kw = w.shape[2:]
    windows = sliding_window_view(x, (kh, kw), axis=(2, 3))[:, :, ::stride, ::stride]  # N, C, H', W', kh, kw
    y = np.einsum("nchwij,ocij->nohw", windows, w)
    return y if b is None else y + b[None, :, None, None]


def conv_1x1(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The seed notebook's conv_1x1 on a (1, C, 1, 1) input."""
    out = np.dot(w.reshape(w.shape[0], -1), x.reshape(-1)) + b
    return out.reshape(1, -1, 1, 1)


def relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0.0)
