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


def layer_norm(x: np.ndarray, axis: int, weight: np.ndarray | None, bias: np.ndarray | None, eps: float) -> np.ndarray:
    """LayerNorm over one axis (biased variance), the weight and bias along that axis."""
    mean = x.mean(axis=axis, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=axis, keepdims=True)
    y = (x - mean) / np.sqrt(var + eps)
    shape = [1] * x.ndim
    shape[axis] = -1
    if weight is not None:
        y = y * weight.reshape(shape)
    if bias is not None:
        y = y + bias.reshape(shape)
    return y


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def shift_mask(padded: tuple[int, int], window: tuple[int, int], shift: tuple[int, int]) -> np.ndarray:
    """Swin's shifted-window mask (windows, S, S): 0 within a region of the shifted map, -100 across regions."""
    (ph, pw), (wh, ww) = padded, window
    img = np.zeros((ph, pw))
    count = 0
    for hs in (slice(0, ph - wh), slice(ph - wh, ph - shift[0]), slice(ph - shift[0], ph)):
        for ws in (slice(0, pw - ww), slice(pw - ww, pw - shift[1]), slice(pw - shift[1], pw)):
            img[hs, ws] = count
            count += 1
    windows = img.reshape(ph // wh, wh, pw // ww, ww).transpose(0, 2, 1, 3).reshape(-1, wh * ww)
    diff = windows[:, None, :] - windows[:, :, None]
    return np.where(diff != 0, -100.0, 0.0)


def window_attention(x, qkv_w, proj_w, rel_bias, window, heads, shift, qkv_b, proj_b, logit_scale=None):
    """Swin's shifted window attention on a (B, H, W, C) map, written from the paper's steps: pad, cyclic shift,
    windows, multi-head attention with relative position bias (cosine attention when ``logit_scale`` is given, Swin
    v2, whose key bias is zero) and the shift mask, output projection, reverse."""
    b, h, w, c = x.shape
    wh, ww = window
    pad_b, pad_r = (wh - h % wh) % wh, (ww - w % ww) % ww
    x = np.pad(x, ((0, 0), (0, pad_b), (0, pad_r), (0, 0)))
    ph, pw = h + pad_b, w + pad_r
    shift = (0 if wh >= ph else shift[0], 0 if ww >= pw else shift[1])
    if sum(shift):
        x = np.roll(x, (-shift[0], -shift[1]), axis=(1, 2))
    nh, nw, s, d = ph // wh, pw // ww, wh * ww, c // heads
    win = x.reshape(b, nh, wh, nw, ww, c).transpose(0, 1, 3, 2, 4, 5).reshape(-1, s, c)
    if logit_scale is not None:
        qkv_b = qkv_b.copy()
        qkv_b[c : 2 * c] = 0
    q, k, v = linear(win, qkv_w, qkv_b).reshape(-1, s, 3, heads, d).transpose(2, 0, 3, 1, 4)
    if logit_scale is not None:
        unit = lambda t: t / np.maximum(np.linalg.norm(t, axis=-1, keepdims=True), 1e-12)
        attn = unit(q) @ unit(k).transpose(0, 1, 3, 2) * np.exp(np.minimum(logit_scale, np.log(100.0)))
    else:
        attn = (q * d**-0.5) @ k.transpose(0, 1, 3, 2)
    attn = attn + rel_bias
    if sum(shift):
        attn = (attn.reshape(b, nh * nw, heads, s, s) + shift_mask((ph, pw), window, shift)[None, :, None]).reshape(
            -1, heads, s, s
        )
    out = (softmax(attn) @ v).transpose(0, 2, 1, 3).reshape(-1, s, c)
    out = linear(out, proj_w, proj_b).reshape(b, nh, nw, wh, ww, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, ph, pw, c)
    if sum(shift):
        out = np.roll(out, shift, axis=(1, 2))
    return out[:, :h, :w, :]


def routed_experts(x: np.ndarray, index: np.ndarray, weights: np.ndarray, gate_up: np.ndarray, down: np.ndarray):
    """A mixture of SiLU-gated experts, token by token as routed: x (T, C), index and weights (T, k), gate_up
    (E, 2I, C) (gate rows first), down (E, C, I) -> (T, C)."""
    out = np.zeros_like(x)
    inner = down.shape[2]
    for t in range(x.shape[0]):
        for e, w in zip(index[t], weights[t]):
            h = gate_up[e] @ x[t]
            gate, up = h[:inner], h[inner:]
            out[t] += w * (down[e] @ (gate / (1.0 + np.exp(-gate)) * up))
    return out
