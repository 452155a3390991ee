"""Conv2d (and Conv1d, ConvTranspose2d) -> Linear.

Rules:

* ``conv1x1``: ``Conv2d(C, O, 1)`` with padding 0 and groups 1 (dilation is irrelevant for a 1x1 kernel) is a
  ``Linear(C -> O)`` with weight ``K.view(O, C)`` applied at every pixel. On an ``H x W`` map the values are carried
  channels-last, ``(N, H, W, C)``; consecutive pointwise convs and the elementwise ops between them share one
  permute in and one out. When the map is ``1 x 1`` they are carried as ``(N, C)`` (flatten + Linear + view back).
* ``conv1x1-strided``: with stride ``s`` the conv reads only every ``s``-th pixel: ``x[:, :, ::s, ::s]``, then as above.
  (Checking the kernel size alone is wrong here.)
* ``conv-full-extent``: a Conv2d whose kernel covers its whole input (padding 0, dilation 1) is
  ``Linear(C*H*W -> O)`` on ``flatten(x, 1)`` with weight ``K.view(O, C*H*W)``; the output is carried as ``(N, O)``.
* ``conv1d-k1``: ``Conv1d(C, O, 1)`` is a Linear over ``(N, L, C)``.
* ``convtranspose1x1``: ``ConvTranspose2d(C, O, 1)`` with stride 1 and padding 0 is a Linear with weight
  ``K.view(C, O).t()`` (its kernel is stored in-by-out).

Everything else (groups > 1, padding on a 1x1 kernel, other kernels, strided transposed convs) is skipped with the
reason.
"""

from __future__ import annotations

import math
import operator

import torch
import torch.fx as fx
from torch import nn

from fxsurgery.layers import ChannelsLastBatchNorm2d
from fxsurgery.result import Site
from fxsurgery.rules._engine import (
    Layout,
    Rewriter,
    Skip,
    feeds_candidate,
    guard,
    module_skip_reason,
    permutation_layout,
    static_shape,
)
from fxsurgery.tracing import shape_of
from fxsurgery.weights import conv_to_linear_weight, conv_transpose_to_linear_weight

__all__ = ["ConvToLinear", "channels_last_layout", "FLAT_LAYOUT"]

_CANDIDATES = (nn.Conv1d, nn.Conv2d, nn.ConvTranspose2d)


def channels_last_layout(rank: int) -> Layout:
    """NC* values carried as N*C (channels last), for tensors of ``rank`` dims."""
    return permutation_layout(f"channels-last/{rank}d", (0, *range(2, rank), 1))


_CL = {3: channels_last_layout(3), 4: channels_last_layout(4)}


def _enter_flat(graph: fx.Graph, x: fx.Node, site: str) -> fx.Node:
    checked = guard(graph, x, (1, 1), site, original_rejects=False)
    return graph.call_function(torch.flatten, (checked, 1))


def _exit_flat(graph: fx.Graph, alt: fx.Node, orig: fx.Node) -> fx.Node:
    return graph.call_method("reshape", (alt, (-1, static_shape(orig, "a flat value")[1], 1, 1)))


#: ``(N, C, 1, 1)`` values carried as ``(N, C)``.
FLAT_LAYOUT = Layout("(N,C)", _enter_flat, _exit_flat)


def _pair(v: int | tuple[int, ...], rank: int) -> tuple[int, ...]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * (rank - 2)


class ConvToLinear:
    """Rewrite pointwise, strided-pointwise and full-extent convolutions as Linear layers."""

    pattern_names = ("conv1x1", "conv1x1-strided", "conv-full-extent", "conv1d-k1", "convtranspose1x1")

    def is_candidate(self, node: fx.Node, rw: Rewriter) -> bool:
        """Pointwise kernels, and kernels as large as their input; other convolutions are not Linear layers."""
        if node.op != "call_module" or not isinstance(mod := rw.modules.get(str(node.target)), _CANDIDATES):
            return False
        kernel = tuple(mod.kernel_size)
        if all(k == 1 for k in kernel):
            return True
        x = node.args[0] if node.args else None
        return (shape_of(x) or ())[2:] == kernel

    def propagate(self, node: fx.Node, rw: Rewriter) -> bool:
        """A ``BatchNorm2d`` on a map carried channels-last, whose output reaches another pointwise conv (through
        elementwise ops, residual adds, BatchNorms), stays channels-last
        (:class:`~fxsurgery.layers.ChannelsLastBatchNorm2d`, a per-channel affine in eval mode), so the pointwise
        convs around it share one conversion instead of converting back and forth."""
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs or node.args[0] not in rw.alt:
            return False
        name = str(node.target)
        mod = rw.modules.get(name)
        alt, layout = rw.alt[node.args[0]]  # type: ignore[index]
        if type(mod) is not nn.BatchNorm2d or layout is not _CL[4] or name in rw.new_modules:
            return False
        if module_skip_reason(name, mod, (nn.BatchNorm2d,), rw) is not None:
            return False
        if not feeds_candidate(node, rw, self, through=(nn.BatchNorm2d,)):
            return False  # a 3x3 conv comes next: converting back before or after the BatchNorm costs the same
        rw.new_modules[name] = ChannelsLastBatchNorm2d.sharing(mod)
        with rw.graph.inserting_before(node):
            rw.set_alt(node, rw.graph.call_module(name, (alt,)), layout)
        return True

    def describe(self, node: fx.Node, rw: Rewriter) -> tuple[str, str]:
        mod = rw.modules[str(node.target)]
        if isinstance(mod, nn.ConvTranspose2d):
            pattern = "convtranspose1x1"
        elif isinstance(mod, nn.Conv1d):
            pattern = "conv1d-k1"
        elif any(k != 1 for k in mod.kernel_size):
            pattern = "conv-full-extent"
        elif any(s != 1 for s in mod.stride):
            pattern = "conv1x1-strided"
        else:
            pattern = "conv1x1"
        return str(node.target), pattern

    def apply(self, node: fx.Node, rw: Rewriter) -> Site:
        name, pattern = self.describe(node, rw)
        mod = rw.modules[name]
        exact = (type(mod),) if type(mod) in _CANDIDATES else (_base(mod),)
        reason = module_skip_reason(name, mod, exact, rw)
        if reason:
            raise Skip(reason)
        if not isinstance(node.args[0], fx.Node) or len(node.args) != 1 or node.kwargs:
            raise Skip("called with extra arguments (output_size?)")
        x = node.args[0]
        shape = static_shape(x, "the conv input")
        rank = len(shape)
        if rank != mod.weight.dim():
            raise Skip(f"unbatched {rank}-D input")
        spatial = shape[2:]
        kernel, stride, dilation = mod.kernel_size, mod.stride, mod.dilation
        padding = (0,) * len(kernel) if mod.padding in ("valid", "same") and all(k == 1 for k in kernel) else mod.padding
        if isinstance(padding, str):
            raise Skip(f"padding={padding!r} on a {'x'.join(map(str, kernel))} kernel")
        if mod.groups != 1:
            raise Skip(f"groups={mod.groups}")
        pointwise = all(k == 1 for k in kernel)
        if pointwise:
            if any(padding):
                raise Skip(f"padding={tuple(padding)} (a padded 1x1 conv adds a border of bias-only outputs)")
            if isinstance(mod, nn.ConvTranspose2d):
                if any(s != 1 for s in stride):
                    raise Skip(f"stride {tuple(stride)} (a transposed conv inserts zeros between pixels)")
                if any(mod.output_padding):
                    raise Skip(f"output_padding={tuple(mod.output_padding)}")
            return self._pointwise(node, rw, mod, name, pattern, x, shape, stride)
        if isinstance(mod, nn.ConvTranspose2d):
            raise Skip(f"kernel {'x'.join(map(str, kernel))} on a transposed conv")
        if tuple(kernel) == tuple(spatial) and not any(padding):
            if any(d != 1 for d in dilation):
                raise Skip(f"dilation={tuple(dilation)}")
            return self._full_extent(node, rw, mod, name, pattern, x, shape)
        k, s = "x".join(map(str, kernel)), "x".join(map(str, spatial))
        extra = f" with padding={tuple(padding)}" if any(padding) else ""
        raise Skip(f"kernel {k}{extra} is neither pointwise nor the full {s} input")

    def _pointwise(
        self, node: fx.Node, rw: Rewriter, mod: nn.Module, name: str, pattern: str, x: fx.Node,
        shape: tuple[int, ...], stride: tuple[int, ...],
    ) -> Site:  # fmt: skip
        rank = len(shape)
        strided = any(s != 1 for s in stride)
        out_spatial = tuple(math.ceil(d / s) for d, s in zip(shape[2:], stride))
        if x in rw.alt:
            layout = rw.alt[x][1]
        elif rank == 4 and all(d == 1 for d in out_spatial) and not strided:
            layout = FLAT_LAYOUT
        else:
            layout = _CL[rank]
        if layout is FLAT_LAYOUT and strided and x not in rw.alt:
            layout = _CL[rank]
        with rw.graph.inserting_before(node):
            if strided and layout is not FLAT_LAYOUT:
                if x in rw.alt and rw.alt[x][1] is layout:  # slice channels-last: N, *spatial, C
                    index = (slice(None), *(slice(None, None, s) for s in stride), slice(None))
                    src = rw.graph.call_function(operator.getitem, (rw.alt[x][0], index))
                else:
                    index = (slice(None), slice(None), *(slice(None, None, s) for s in stride))
                    src = rw.enter(rw.graph.call_function(operator.getitem, (rw.exit_of(x), index)), layout, name)
            else:
                src = rw.enter(x, layout, name)
            rw.new_modules[name] = _linear_from_conv(mod)
            lin = rw.graph.call_module(name, (src,))
        rw.set_alt(node, lin, layout)
        kind = "ConvTranspose2d" if isinstance(mod, nn.ConvTranspose2d) else type(mod).__name__
        spatial = "x".join(map(str, shape[2:]))
        step = f" stride {'x'.join(map(str, stride))}," if strided else ""
        before = f"{kind}({shape[1]}, {mod.out_channels}, 1){step} on {spatial}"
        where = "(N, C)" if layout is FLAT_LAYOUT else "channels-last"
        after = f"{'slice + ' if strided else ''}Linear({shape[1]}->{mod.out_channels}) {where}"
        return Site(name, pattern, "rewritten", before=before, after=after, input_shape=tuple(shape))

    def _full_extent(
        self, node: fx.Node, rw: Rewriter, mod: nn.Module, name: str, pattern: str, x: fx.Node,
        shape: tuple[int, ...],
    ) -> Site:  # fmt: skip
        with rw.graph.inserting_before(node):
            checked = guard(rw.graph, rw.exit_of(x), tuple(shape[2:]), name, original_rejects=False)
            flat = rw.graph.call_function(torch.flatten, (checked, 1))
            rw.new_modules[name] = _linear_from_conv(mod)
            lin = rw.graph.call_module(name, (flat,))
        if len(shape) == 4:
            rw.set_alt(node, lin, FLAT_LAYOUT)
        else:
            with rw.graph.inserting_after(lin):
                back = rw.graph.call_method("unsqueeze", (lin, -1))
            node.replace_all_uses_with(back)
            rw.graph.erase_node(node)
        spatial = "x".join(map(str, shape[2:]))
        before = f"{type(mod).__name__}({shape[1]}, {mod.out_channels}, kernel={spatial}) on {spatial}"
        after = f"flatten + Linear({math.prod(shape[1:])}->{mod.out_channels})"
        return Site(name, pattern, "rewritten", before=before, after=after, input_shape=tuple(shape))


def _base(mod: nn.Module) -> type:
    return next(t for t in _CANDIDATES if isinstance(mod, t))


def _linear_from_conv(conv: nn.Module) -> nn.Linear:
    if isinstance(conv, nn.ConvTranspose2d):
        weight = conv_transpose_to_linear_weight(conv.weight.detach())
    else:
        weight = conv_to_linear_weight(conv.weight.detach())
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=conv.bias is not None, device="meta", dtype=weight.dtype)
    lin.weight = nn.Parameter(weight, requires_grad=conv.weight.requires_grad)
    if conv.bias is not None:
        lin.bias = conv.bias
    lin.train(conv.training)
    return lin
