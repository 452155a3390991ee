"""``to="auto"``: per site, keep the faster of the original and the rewritten form, measured on the target runtime.

1. Both passes run (``linear_to_conv`` and ``conv_to_linear``, without validation) to list the sites and the map each
   rewritten layer reads.
2. Per site, the layer alone (a flatten + Linear, or the conv) and its rewritten form (built by the same pass, layout
   conversions included, so this is the worst case for a site inside a chain) are timed side by side on the runtime,
   alternating A B, B A, ... The rewritten form is kept when its median ratio is below 1. Sites of the same kind and
   shape are measured once. Transformer-style sites (token layout, ConvNeXt/Swin blocks) are decided per block
   instead: the nearest enclosing module with a LayerNorm child of its own is timed alone, original against
   rewritten, on the input it receives in the model, and all its sites follow (blocks alike in type and shapes
   are measured once).
3. The kept sites are applied (Linear -> conv first, then conv -> Linear on the other layers) and the whole model is
   timed against the original, together with all-conv and all-linear; the fastest is returned if it measured at least
   ``MARGIN`` (2%) faster than the original, else the original. The result is therefore never slower than the
   original by more than the measurement noise, and within about 2% of the better of all-conv and all-linear.

The choice, per site and for the whole model, is in ``result.timings``; the final model is validated like any other.
"""

from __future__ import annotations

import copy
import logging
import math
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fxsurgery import validation as _validation
from fxsurgery.errors import InputError, ValidationError
from fxsurgery.result import Site, SurgeryResult
from fxsurgery.surgery import capture_submodule_inputs
from fxsurgery.timing import Ratio, interleaved, runner
from fxsurgery.tracing import working_copy

__all__ = ["RUNTIMES", "auto_rewrite"]

log = logging.getLogger(__name__)

RUNTIMES = ("onnxruntime", "torch")
DIRECTIONS = ("linear_to_conv", "conv_to_linear")
#: A rewritten whole model is kept only when it measured at least this much faster than the original: a gain
#: inside the noise of the measurement is not worth a changed graph, and could be a loss in the next run.
MARGIN = 0.02


def _site_alone(model: nn.Module, site: Site, direction: str) -> tuple[nn.Module, torch.Tensor] | None:
    """The site's layer alone, as a model on the value it reads, or None when that cannot be built."""
    if site.input_shape is None or site.pattern == "window-attention":
        return None  # window attention is a function of several layers: timed only within the whole model
    try:
        layer = copy.deepcopy(model.get_submodule(site.name))
    except AttributeError:
        return None  # a functional site: no module to time alone
    shape = tuple(site.input_shape)
    x = torch.randn(shape, dtype=next(layer.parameters()).dtype)
    if direction != "linear_to_conv":
        return nn.Sequential(layer), x
    if isinstance(layer, nn.MultiheadAttention):
        return _SelfAttention(layer), x
    if len(shape) == 3:  # tokens (B, S, C)
        return nn.Sequential(layer), x
    if len(shape) == 4 and math.prod(shape[1:]) == layer.in_features:  # a flattened (or 1x1) map
        return nn.Sequential(nn.Flatten(), layer), x
    if len(shape) == 4 and shape[1] == layer.in_features:  # an NCHW map the Linear reads channels-last
        return _ChannelsLast(layer), x
    return None


class _ChannelsLast(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class _SelfAttention(nn.Module):
    def __init__(self, layer: nn.MultiheadAttention) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x, x, x, need_weights=False)[0]


def auto_rewrite(
    model: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    *,
    runtime: str = "onnxruntime",
    pairs: int = 5,
    threads: int = 2,
    rewrite: Callable[..., SurgeryResult],
    validate: bool = True,
    rewrite_kwargs: dict[str, Any],
) -> SurgeryResult:
    """See the module docstring. ``rewrite`` is :func:`fxsurgery.rewrite` (passed in to avoid an import cycle)."""
    if runtime not in RUNTIMES:
        raise InputError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
    if len(inputs) != 1:
        raise InputError("to='auto' times models on one input tensor; this model takes several")
    kwargs = {k: v for k, v in rewrite_kwargs.items() if k not in ("precision", "rtol", "num_random", "seed")}
    full = {d: rewrite(model, inputs, d, validate=False, **kwargs) for d in DIRECTIONS}
    choices: list[dict[str, Any]] = []
    keep: dict[str, list[str]] = {d: [] for d in DIRECTIONS}
    cache: dict[tuple, Ratio] = {}

    def decide(direction: str, name: str, chosen: str, **detail: Any) -> None:
        if chosen == "rewritten":
            keep[direction].append(name)
        choices.append({"site": name, "direction": direction, "chosen": chosen, **detail})

    def measured(direction: str, name: str, r: Ratio, **detail: Any) -> None:
        decide(direction, name, "rewritten" if r.median < 1.0 else "original", **detail, ratio=r.median,
               original_ms=r.a_ms, rewritten_ms=r.b_ms)  # fmt: skip

    with tempfile.TemporaryDirectory(prefix="fxsurgery-auto-") as tmp:
        work = Path(tmp)

        def ratio(key: tuple, module: nn.Module, x: torch.Tensor, direction: str) -> Ratio:
            """``module`` against its rewritten form on ``x`` (measured once per key)."""
            if key not in cache:
                form = rewrite(module, (x,), direction, validate=False, **kwargs).module
                cache[key] = interleaved(runner(module, x, runtime, work, threads),
                                         runner(form, x, runtime, work, threads), pairs)  # fmt: skip
            return cache[key]

        for direction, res in full.items():
            attention = {s.name for s in res.rewritten if s.pattern == "self-attention"}
            followers = []  # an attention's out_proj: rewritten with its attention or not at all
            blocks = _blocks(model, res.rewritten) if direction == "linear_to_conv" else {}
            grouped = _by_block(blocks)
            captured = capture_submodule_inputs(model, inputs, [b for b in grouped if b])[0] if grouped else {}
            for block, sites in grouped.items():
                r = _measure_block(model, captured.get(block), block, direction, ratio)
                for name in sites:
                    if r is None:
                        del blocks[name]  # not measurable as a block: per site below
                    else:
                        measured(direction, name, r, block=block)
            for site in res.rewritten:
                if site.name in blocks:
                    continue
                if "." in site.name and site.name.rsplit(".", 1)[0] in attention:
                    followers.append(site.name)
                    continue
                alone = _site_alone(model, site, direction)
                if alone is None:
                    decide(direction, site.name, "original",
                           why="not measurable alone (a functional site or window attention)")  # fmt: skip
                    continue
                original, x = alone
                layer = original[-1] if isinstance(original, nn.Sequential) else original.layer
                key = (direction, site.pattern, type(layer).__name__, tuple(p.shape for p in layer.parameters()),
                       site.input_shape, getattr(layer, "stride", None))  # fmt: skip
                measured(direction, site.name, ratio(key, original, x, direction))
            for name in followers:
                parent = name.rsplit(".", 1)[0]
                chosen = next(c["chosen"] for c in choices if c["site"] == parent and c["direction"] == direction)
                decide(direction, name, chosen, why=f"part of {parent}")
        candidates = {
            "auto": _compose(model, inputs, full, keep, rewrite, kwargs),
            "all-conv": full["linear_to_conv"].module,
            "all-linear": full["conv_to_linear"].module,
        }
        x = inputs[0]
        base = runner(model, x, runtime, work, threads)
        whole: dict[str, dict[str, float]] = {}
        for label, module in candidates.items():
            r = interleaved(base, runner(module, x, runtime, work, threads), pairs)
            whole[label] = {"ratio": r.median, "low": r.low, "high": r.high, "original_ms": r.a_ms,
                            "candidate_ms": r.b_ms}  # fmt: skip
    best = min(whole, key=lambda k: whole[k]["ratio"])
    if whole[best]["ratio"] > 1.0 - MARGIN:
        best = "original"
    chosen_module = {"original": working_copy(model), **candidates}[best]
    sites = _chosen_sites(full, keep, best)
    timings = {"runtime": runtime, "pairs": pairs, "threads": threads, "sites": choices, "whole_model": whole,
               "chosen": best}  # fmt: skip
    notes = (f"auto ({runtime}): chose {best}; whole-model ratios vs original: "
             + ", ".join(f"{k} {v['ratio']:.2f}" for k, v in whole.items()),)
    result = SurgeryResult(chosen_module, sites, None, "auto", notes, timings)
    if not validate:
        return result
    check = _validation.validate(model, chosen_module, inputs, **{k: v for k, v in rewrite_kwargs.items()
                                                                 if k in ("precision", "rtol", "num_random", "seed")})  # fmt: skip
    result = SurgeryResult(chosen_module, sites, check, "auto", notes, timings)
    if not check:
        raise ValidationError(f"validation failed: {check.failure}", result=result)
    return result


_BLOCK_PATTERNS = ("token-linear", "self-attention", "window-attention", "channels-last-linear", "chain-linear")


def _blocks(model: nn.Module, sites: Sequence[Site]) -> dict[str, str]:
    """Transformer-style sites and their block: the nearest enclosing module with a LayerNorm child of its own (a
    ViT encoder layer, a Swin or ConvNeXt block). Sites outside any such module are decided one by one."""
    out = {}
    for site in sites:
        if site.pattern not in _BLOCK_PATTERNS:
            continue
        parts = site.name.split(".")
        for cut in range(len(parts) - 1, -1, -1):
            try:
                owner = model.get_submodule(".".join(parts[:cut]))
            except AttributeError:
                continue  # a functional site is named after its graph node, not a module path
            if any(type(c) is nn.LayerNorm for c in owner.children()):
                out[site.name] = ".".join(parts[:cut])
                break
    return out


def _by_block(blocks: dict[str, str]) -> dict[str, list[str]]:
    grouped: dict[str, list[str]] = {}
    for name, block in blocks.items():
        grouped.setdefault(block, []).append(name)
    return grouped


def _measure_block(
    model: nn.Module, block_inputs: tuple[torch.Tensor, ...] | None, block: str, direction: str,
    ratio: Callable[[tuple, nn.Module, torch.Tensor, str], Ratio],
) -> Ratio | None:  # fmt: skip
    """The block alone, original against rewritten, on the input it receives in the model; None when it cannot be
    run alone (the whole model, not captured, several inputs, or a rewrite that fails on it)."""
    if not block or block_inputs is None or len(block_inputs) != 1:
        return None
    module, x = model.get_submodule(block), block_inputs[0]
    key = ("block", type(module).__name__, tuple(p.shape for p in module.parameters()), tuple(x.shape))
    try:
        return ratio(key, module, x, direction)
    except Exception:  # a block that does not trace alone: its sites are decided one by one
        log.info("auto: block %s cannot be rewritten alone", block, exc_info=True)
        return None


def _compose(
    model: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    full: dict[str, SurgeryResult],
    keep: dict[str, list[str]],
    rewrite: Callable[..., SurgeryResult],
    kwargs: dict[str, Any],
) -> nn.Module:
    """Linear -> conv on the kept Linear sites, then conv -> Linear on the kept conv sites of the result."""
    drop_l2c = [s.name for s in full["linear_to_conv"].rewritten if s.name not in keep["linear_to_conv"]]
    first = rewrite(model, inputs, "linear_to_conv", validate=False, **{**kwargs, "exclude": _ex(kwargs, drop_l2c)})
    made = [s.name for s in first.rewritten]  # convs that were Linears: not candidates for the way back
    drop_c2l = [s.name for s in full["conv_to_linear"].rewritten if s.name not in keep["conv_to_linear"]]
    second = rewrite(first.module, inputs, "conv_to_linear", validate=False,
                     **{**kwargs, "exclude": _ex(kwargs, [*drop_c2l, *made])})  # fmt: skip
    return second.module


def _ex(kwargs: dict[str, Any], more: Sequence[str]) -> list[str]:
    return [*kwargs.get("exclude", ()), *more]


def _chosen_sites(full: dict[str, SurgeryResult], keep: dict[str, list[str]], best: str) -> list[Site]:
    import dataclasses

    sites = []
    for direction, res in full.items():
        kept = {
            "auto": set(keep[direction]),
            "all-conv": {s.name for s in res.rewritten} if direction == "linear_to_conv" else set(),
            "all-linear": {s.name for s in res.rewritten} if direction == "conv_to_linear" else set(),
            "original": set(),
        }[best]
        for s in res.sites:
            if s.rewritten and s.name not in kept:
                s = dataclasses.replace(s, status="skipped", reason=f"auto: the original form is faster ({best})")
            sites.append(dataclasses.replace(s, pattern=f"{direction}:{s.pattern}"))
    return sites
