"""Functions that rewritten graphs call at run time. They must stay importable under these names."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

__all__ = [
    "check_spatial_size",
    "check_mode",
    "original_shape",
    "layer_norm_channels",
    "window_attention_nchw",
    "shift_mask",
    "output_builder",
    "batch_to_width",
    "maps_side_by_side",
    "batch_from_width",
    "attention_channels",
    "check_exported_size",
    "OutsideExportedRange",
]


def check_spatial_size(
    x: torch.Tensor, expected: tuple[int, ...], site: str, original_rejects: bool = True, features: int | None = None
) -> torch.Tensor:
    """Return ``x`` unchanged if its trailing spatial dims equal ``expected``; else raise, saying what the original
    would do.

    A rewritten site is exact only at the feature-map size it was traced with: an HxW convolution that replaced a
    Linear on a flattened map would otherwise accept a bigger image and return a bigger map where the original raised.
    ``features`` is the Linear's ``in_features``: a map of another size with as many elements per sample is one the
    original accepts (and computes another function of), so the message says to rewrite again at that size, as it
    does where the original accepts other sizes anyway (``original_rejects=False``: a full-extent Conv2d).
    """
    got = tuple(int(d) for d in x.shape[2:])
    if got == tuple(expected):
        return x
    accepted = not original_rejects or (features is not None and x.shape[1] * math.prod(got) == features)
    reason = "the original model rejects this input size too"
    if accepted:
        reason = (
            "the rewrite is exact only at the traced size (the original accepts this one): rewrite again with "
            "example inputs of this size"
        )
    size = "x".join(str(d) for d in expected)
    raise RuntimeError(
        f"fxsurgery: site {site!r} was rewritten for a {size} feature map but got {'x'.join(map(str, got))}; {reason}"
    )


class OutsideExportedRange(RuntimeError):
    """An input size outside those torch.export traced the model for (a static size, or the range of a dynamic
    one): the graph computes for those sizes only."""


def check_exported_size(
    x: torch.Tensor, name: str, sizes: tuple[tuple[int, int], ...], ranges: tuple[tuple[int, int, int | None], ...] = ()
) -> None:
    """Raise, naming the input, if ``x`` differs from the exported size on a dim torch.export kept static
    (``(dim, size)`` pairs): the graph computes for that size only (a HuggingFace model exported at sequence length 8
    has ``arange(8)`` in its graph); or lies outside the range of a dynamic dim (``(dim, low, high)``, high None for
    no bound): the model's forward takes another path there (``y.softmax(-1) if y.shape[0] == 1 else y``)."""
    for dim, size in sizes:
        if x.dim() <= dim or x.shape[dim] != size:
            raise OutsideExportedRange(
                f"fxsurgery: input {name!r} has shape {tuple(x.shape)}, but this graph was exported with size {size} "
                f"on dim {dim}, which torch.export kept static (the batch, where the model allows it, stays dynamic): "
                "call it with that size, or rewrite again with example inputs of the size you will run"
            )
    for dim, low, high in ranges:
        if x.dim() > dim and not (low <= x.shape[dim] and (high is None or x.shape[dim] <= high)):
            span = f"{low} to {high}" if high is not None else f"{low} or more"
            raise OutsideExportedRange(
                f"fxsurgery: input {name!r} has size {x.shape[dim]} on dim {dim}, but torch.export traced this graph "
                f"for sizes {span} there, and computes for those only (the model asserts them, or its forward takes "
                "another path outside them): call the original for that size, or rewrite again with example inputs of "
                "that size"
            )


def batch_to_width(x: torch.Tensor, channels: int) -> torch.Tensor:
    """``(N, K)`` -> ``(1, K, 1, N)``: the batch on the width axis (the spatial batch layout); ``channels`` is the
    static ``K``.

    An empty batch stays ``(0, K, 1, 1)``: torch's convolutions reject a width of 0 but accept a batch of 0, and
    every op carried in this layout works on dim 1, so the rest of the graph runs unchanged. The test is on a static
    or symbolic size (a dynamic batch is at least 2 in ``torch.export``): exported graphs hold no op for it.
    """
    if x.shape[0] == 0:
        return x.reshape(0, channels, 1, 1)
    # permute and view, not t and reshape: quantizers share qparams through them (XNNPACKQuantizer does not through
    # t or reshape, and requantizes there); inserting unit dims is a view of any strides
    return x.permute(1, 0).view(1, channels, 1, -1)


def maps_side_by_side(y: torch.Tensor, channels: int, height: int) -> torch.Tensor:
    """``(N, C, H, W)`` maps -> ``(1, C, H, N*W)`` side by side (a pooled ``(N, C, 1, 1)`` by a 2-D transpose, which
    onnxruntime runs far faster than a 4-D permute); ``channels`` and ``height`` are the static ``C`` and ``H``. An
    empty batch stays as it is (see :func:`batch_to_width`)."""
    if y.shape[0] == 0:
        return y
    if y.shape[2:] == (1, 1):
        return y.flatten(1).permute(1, 0).view(1, channels, 1, -1)
    # flatten, not reshape, makes the one copy (see batch_to_width)
    return y.permute(1, 2, 0, 3).flatten(2).view(1, channels, height, -1)


def batch_from_width(y: torch.Tensor) -> torch.Tensor:
    """``(1, O, 1, N)`` -> ``(N, O)``, the inverse of :func:`batch_to_width` (an empty batch comes as
    ``(0, O, 1, 1)``)."""
    if y.shape[0] == 0:
        return y.flatten(1)
    return y.flatten(0, 2).permute(1, 0)


@functools.cache
def output_builder(cls: type) -> Callable[[dict[str, Any]], Any]:
    """A function that builds the output class ``cls`` (a dict subclass, such as HuggingFace's ``ModelOutput``)
    from the plain dict a traced graph returns: fx keeps tuples and namedtuples but flattens dict subclasses."""

    def build(fields: dict[str, Any]) -> Any:
        try:
            return cls(**fields)  # dataclass-style outputs
        except TypeError:
            return cls(fields)  # OrderedDict-style

    build.__name__ = build.__qualname__ = f"build_{cls.__name__}"
    return build


def original_shape(alt: torch.Tensor, dims: tuple[int | None, ...]) -> torch.Size:
    """The shape of the original of ``alt``, a value carried in a layout whose dim ``i`` holds original dim
    ``dims[i]`` (None: a unit dim the layout adds)."""
    sizes = {d: alt.shape[i] for i, d in enumerate(dims) if d is not None}
    return torch.Size([sizes[d] for d in range(len(sizes))])


def check_mode(training: bool, traced: bool, modules: tuple[str, ...]) -> None:
    """Raise unless the graph runs in the mode it was traced in: ``modules`` branch on ``self.training``, and the
    graph holds only the branch of the traced mode."""
    if bool(training) != traced:
        mode = "training" if traced else "eval"
        raise RuntimeError(
            f"fxsurgery: this graph was traced in {mode} mode and the forward of {', '.join(modules)} branches on "
            "self.training: it "
            f"computes the {mode}-mode branch only; call .{'train' if traced else 'eval'}() on it, or rewrite the "
            f"model again in {'eval' if traced else 'training'} mode"
        )


def layer_norm_channels(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> torch.Tensor:
    """``LayerNorm`` over dim 1 (the channels of an NCHW map, or of an ``(N, C, 1, 1)`` value).

    The NCHW equivalent of ``x.permute(0, 2, 3, 1)`` -> ``LayerNorm(C)`` -> ``permute(0, 3, 1, 2)``, written with
    reductions over dim 1 so no transpose is needed (biased variance, as ``F.layer_norm``).
    """
    mean = x.mean(1, keepdim=True)
    centered = x - mean
    y = centered * torch.rsqrt(centered.pow(2).mean(1, keepdim=True) + eps)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    if weight is not None:
        y = y * weight.reshape(shape)
    if bias is not None:
        y = y + bias.reshape(shape)
    return y


def layer_norm_moved(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> torch.Tensor:
    """:func:`layer_norm_channels` as one ``F.layer_norm`` between two permutes (the channels moved last and back):
    the form quantizers leave whole (the reductions' adds and multiplies would each be quantized), for
    ``quantize=``."""
    last = (0, *range(2, x.dim()), 1)
    back = (0, x.dim() - 1, *range(1, x.dim() - 1))
    return F.layer_norm(x.permute(last), (x.shape[1],), weight, bias, eps).permute(back)


def swap_last(x: torch.Tensor) -> torch.Tensor:
    """The last two dims of a 4-D value swapped, as a permute (which quantizers share qparams through)."""
    return x.permute(0, 1, 3, 2)


def attention_channels(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    is_causal: bool,
    scale: float | None,
    keys: str = "bhdt",
    values: str = "bhdt",
    sdpa: bool = False,
) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` on queries, keys and values carried as ``(B, H, D, S)`` (head_dim before
    the tokens), returning ``(B, H, D, S)``: no transpose of the activations. Keys or values held in SDPA's own
    ``(B, H, T, D)`` (a static KV cache's buffers) are read as they are: ``keys``/``values`` ``"bhtd"``.

    ``scores[b,h,s,t] = scale * sum_d q[b,h,d,s] k[b,h,d,t]`` (``scale`` defaults to ``D ** -0.5``), ``mask``
    broadcast onto ``(B, H, S, T)`` as SDPA does (a boolean False is the lowest finite value, a float is added),
    ``is_causal`` keeps ``t <= s``; ``p = softmax_t(scores)``, with rows masked entirely giving 0 as SDPA gives;
    ``out[b,h,d,s] = sum_t p[b,h,s,t] v[b,h,d,t]``.

    ``sdpa=True`` (``quantize=``) runs SDPA itself on permuted views instead: the one op quantizers leave whole, as
    they leave the original's (its scaling multiply, written out, would be quantized; onnxruntime quantizes MatMul,
    not Einsum).
    """
    if sdpa:
        k, v = (t if own == "bhtd" else swap_last(t) for t, own in ((k, keys), (v, values)))
        return swap_last(F.scaled_dot_product_attention(swap_last(q), k, v, mask, is_causal=is_causal, scale=scale))
    scores = torch.einsum(f"bhds,{keys}->bhst", q, k) * (q.shape[-2] ** -0.5 if scale is None else scale)
    keep = None  # the keys each query reads, where causality or a boolean mask says
    if is_causal:
        keep = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).tril()
    if mask is not None and mask.dtype == torch.bool:
        keep = mask if keep is None else torch.logical_and(keep, mask)  # (coremltools knows no aten.__and__)
    if keep is not None:  # the lowest finite value, not -inf (softmax gives 0 either way): a quantizer calibrates on it
        scores = scores.masked_fill(torch.logical_not(keep), torch.finfo(scores.dtype).min)
    if mask is not None and mask.dtype != torch.bool:
        scores = scores + mask
    p = torch.softmax(scores, dim=-1)
    if mask is not None:  # a row with every key masked: SDPA returns zeros, softmax NaN or a uniform row
        # (== -inf, not isneginf: OpenVINO's and coremltools' PyTorch frontends have no isneginf; a count of the keys
        # kept, not .all(): onnxruntime's symbolic shape inference, which its quantization tools run, knows ReduceSum
        # and not ReduceMin)
        kept = scores != float("-inf") if keep is None else torch.logical_and(keep, scores != float("-inf"))
        p = p.masked_fill(kept.sum(-1, keepdim=True) == 0, 0.0)
    return torch.einsum(f"bhst,{values}->bhds", p, v)


def shift_mask(canvas: torch.Tensor, window: tuple[int, int], shift: list[int]) -> torch.Tensor:
    """The attention mask of shifted windows, ``(windows, S, S)``: 0 between tokens of the same region of the shifted
    map, -100 between regions (torchvision's ``shifted_window_attention``). ``canvas`` is a zero ``(H, W)`` map of
    the padded size; it is filled with region numbers."""
    (wh, ww), (pad_h, pad_w) = window, canvas.shape
    h_slices = ((0, -wh), (-wh, -shift[0]), (-shift[0], None))
    w_slices = ((0, -ww), (-ww, -shift[1]), (-shift[1], None))
    count = 0
    for hs in h_slices:
        for ws in w_slices:
            canvas[hs[0] : hs[1], ws[0] : ws[1]] = count
            count += 1
    nh, nw = pad_h // wh, pad_w // ww
    mask = canvas.view(nh, wh, nw, ww).permute(0, 2, 1, 3).reshape(nh * nw, wh * ww)
    mask = mask.unsqueeze(1) - mask.unsqueeze(2)
    return mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)


def window_attention_nchw(
    x: torch.Tensor,
    qkv_weight: torch.Tensor,
    proj_weight: torch.Tensor,
    relative_position_bias: torch.Tensor,
    window_size: list[int],
    num_heads: int,
    shift_size: list[int],
    attention_dropout: float = 0.0,
    dropout: float = 0.0,
    qkv_bias: torch.Tensor | None = None,
    proj_bias: torch.Tensor | None = None,
    logit_scale: torch.Tensor | None = None,
    training: bool = True,
) -> torch.Tensor:
    """torchvision's ``shifted_window_attention`` (Swin v1 and v2) on an NCHW map instead of ``(B, H, W, C)``.

    The same steps (pad, cyclic shift, window partition, attention with relative position bias and the shift mask,
    reverse), with each window's tokens carried as ``(B*windows, C, 1, S)``: the q/k/v and output projections are
    1x1 convolutions (``qkv_weight`` is ``(3C, C, 1, 1)``, ``proj_weight`` ``(C, C, 1, 1)``) and the activations
    are not transposed to channels-last.
    """
    b, c, h, w = x.shape
    wh, ww = window_size
    pad_r, pad_b = (ww - w % ww) % ww, (wh - h % wh) % wh
    x = F.pad(x, (0, pad_r, 0, pad_b))
    pad_h, pad_w = h + pad_b, w + pad_r
    shift = [0 if wh >= pad_h else shift_size[0], 0 if ww >= pad_w else shift_size[1]]
    if sum(shift) > 0:
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(2, 3))
    nh, nw, s, d = pad_h // wh, pad_w // ww, wh * ww, c // num_heads
    x = x.view(b, c, nh, wh, nw, ww).permute(0, 2, 4, 1, 3, 5).reshape(-1, c, 1, s)  # windows: (B*nW, C, 1, S)
    if logit_scale is not None and qkv_bias is not None:
        qkv_bias = torch.cat([qkv_bias[:c], torch.zeros_like(qkv_bias[c : 2 * c]), qkv_bias[2 * c :]])
    q, k, v = F.conv2d(x, qkv_weight, qkv_bias).reshape(-1, 3, num_heads, d, s).unbind(1)  # (B*nW, heads, d, S)
    if logit_scale is not None:  # cosine attention (v2)
        attn = F.normalize(q, dim=2).transpose(-2, -1).matmul(F.normalize(k, dim=2))
        attn = attn * torch.clamp(logit_scale, max=math.log(100.0)).exp()
    else:
        attn = (q * d**-0.5).transpose(-2, -1).matmul(k)
    attn = attn + relative_position_bias
    if sum(shift) > 0:
        mask = shift_mask(x.new_zeros((pad_h, pad_w)), (wh, ww), shift)
        attn = (attn.view(-1, nh * nw, num_heads, s, s) + mask.unsqueeze(1).unsqueeze(0)).view(-1, num_heads, s, s)
    attn = F.dropout(F.softmax(attn, dim=-1), p=attention_dropout, training=training)
    out = v.matmul(attn.transpose(-2, -1)).reshape(-1, c, 1, s)  # (B*nW, C, 1, S)
    out = F.dropout(F.conv2d(out, proj_weight, proj_bias), p=dropout, training=training)
    out = out.view(b, nh, nw, c, wh, ww).permute(0, 3, 1, 4, 2, 5).reshape(b, c, pad_h, pad_w)
    if sum(shift) > 0:
        out = torch.roll(out, shifts=(shift[0], shift[1]), dims=(2, 3))
    return out[:, :, :h, :w].contiguous()
