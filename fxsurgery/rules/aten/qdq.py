"""What the quantized rules read off a quantized graph: PT2E's ``quantized_decomposed`` quantize/dequantize ops
(per tensor, per channel) and torchao's ``dequantize_affine`` (per block), in ATen or Edge dialect.

A quantized layer in such a graph is an *island*: ``dq(x_int8) -> linear/conv(., dq(W_int8), b) -> q``. Its float
ops are what a backend fuses into one int8 kernel, so a rewrite must keep each island whole: layout ops (views,
permutes) go on the int8 side of a ``q`` or before a ``dq``, never between a ``dq`` and the op it feeds.
"""

from __future__ import annotations

from typing import Any

import torch.fx as fx

from fxsurgery.engine.emit import op_name

__all__ = [
    "DEQUANTIZE",
    "is_quantize",
    "is_dequantize",
    "holds_quantized_ops",
    "weight_dequantize",
    "island_exit",
    "requantized",
    "PER_TENSOR",
]

_QUANTIZE = ("quantized_decomposed::quantize_per_tensor", "quantized_decomposed::quantize_per_channel")
DEQUANTIZE = (
    "quantized_decomposed::dequantize_per_tensor",
    "quantized_decomposed::dequantize_per_channel",
    "torchao::dequantize_affine",
)
PER_TENSOR = ("quantized_decomposed::quantize_per_tensor", "quantized_decomposed::dequantize_per_tensor")
_OTHER = (  # quantization that is not a q/dq pair on a constant: the rules say so instead of guessing
    "quantized_decomposed::choose_qparams",
    "quantized_decomposed::dequantize_per_channel_group",
    "torchao::quantize_affine",
    "torchao::choose_qparams_affine",
)
# ops with one tensor input that act element by element, which a quantized layer's output may pass before its q
# (a fused ReLU / ReLU6 / clamp)
_UNARY = ("aten::relu", "aten::relu_", "aten::hardtanh", "aten::hardtanh_", "aten::clamp")


def is_quantize(node: Any) -> bool:
    return isinstance(node, fx.Node) and op_name(node.target) in _QUANTIZE


def is_dequantize(node: Any) -> bool:
    return isinstance(node, fx.Node) and op_name(node.target) in DEQUANTIZE


def holds_quantized_ops(graph: fx.Graph) -> bool:
    """Whether ``graph`` (or a graph it calls) holds quantize/dequantize ops: a PT2E- or torchao-quantized model."""
    names = (*_QUANTIZE, *DEQUANTIZE, *_OTHER)
    return any(n.op == "call_function" and op_name(n.target).startswith(names) for n in graph.nodes)


def weight_dequantize(w: Any) -> tuple[fx.Node, fx.Node] | None:
    """``(dq, W_int)`` when ``w`` is the dequantize of a constant (a parameter, buffer or lifted constant) with the
    per-channel axis, if any, on the output channels (0)."""
    if not is_dequantize(w):
        return None
    src = w.args[0]
    if not isinstance(src, fx.Node) or src.op not in ("placeholder", "get_attr"):
        return None
    if op_name(w.target) == "quantized_decomposed::dequantize_per_channel" and w.args[3] != 0:
        return None
    return w, src


def requantized(x: Any) -> fx.Node | None:
    """The per-tensor quantize ``q`` when ``x`` is ``dq(q(...))`` per tensor (a value entering an island), else None."""
    if not isinstance(x, fx.Node) or op_name(x.target) != PER_TENSOR[1]:
        return None
    q = x.args[0]
    return q if isinstance(q, fx.Node) and op_name(q.target) == PER_TENSOR[0] else None


def island_exit(node: fx.Node) -> tuple[list[fx.Node], fx.Node] | None:
    """``(ops, q)`` when ``node``'s value reaches a per-tensor quantize ``q`` through element-wise ``ops`` only (a fused
    activation), each the only reader of the one before: the end of ``node``'s island."""
    ops: list[fx.Node] = []
    cur = node
    for _ in range(4):
        if len(cur.users) != 1:
            return None
        (user,) = cur.users
        if op_name(user.target) == PER_TENSOR[0] and user.args[0] is cur:
            return ops, user
        if op_name(user.target) not in _UNARY or user.args[0] is not cur:
            return None
        ops.append(user)
        cur = user
    return None
