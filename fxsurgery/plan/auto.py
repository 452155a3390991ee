"""``to="auto"``: per site, keep the faster of the original and the rewritten form, measured on the target runtime.

1. The pipeline runs both passes (``linear_to_conv`` and ``conv_to_linear``, without validation), which list the
   sites and the map each rewritten layer reads, and hands them to this planner with its pass.
2. Per site, the layer alone (a flatten + Linear, or the conv) and its rewritten form (built by the same pass, layout
   conversions included, so this is the worst case for a site inside a chain) are timed side by side on the runtime,
   alternating A B, B A, ... The rewritten form is kept when its median ratio is below 1. Sites of the same kind and
   shape are measured once. Transformer-style sites (token layout, ConvNeXt/Swin blocks) are decided per block
   instead: the nearest enclosing module with a LayerNorm child of its own is timed alone, original against
   rewritten, on the input it receives in the model, and all its sites follow (blocks alike in type and shapes
   are measured once).
3. The kept sites are applied (Linear -> conv first, then conv -> Linear on the other layers) and the whole model is
   timed against the original, together with all-conv and all-linear (where the sites kept are none, or all of one
   direction, that model is the original, all-conv or all-linear: measured once); the fastest is returned if it
   measured at least ``MARGIN`` (2%) faster than the original, else the original. The result is therefore never
   slower than the original by more than the measurement noise, and within about 2% of the better of all-conv and
   all-linear.

The choice, per site and for the whole model, is in ``result.timings``; the pipeline validates the model chosen as it
validates any pass's result.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fxsurgery.capture import capture_submodule_inputs, working_copy
from fxsurgery.engine import subgraph
from fxsurgery.engine.rule import owns_children, timing_of
from fxsurgery.options import Options
from fxsurgery.report import Site, SurgeryResult
from fxsurgery.rules import DIRECTIONS as RULE_DIRECTIONS
from fxsurgery.rules import rule_set
from fxsurgery.runtimes.timing import Ratio, interleaved, runner

__all__ = ["plan_auto", "Rewrite", "MARGIN", "TIMING_EXPORTER", "DIRECTIONS"]

log = logging.getLogger(__name__)

DIRECTIONS = tuple(RULE_DIRECTIONS.values())  # linear_to_conv, conv_to_linear
#: The pipeline's pass: ``rewrite(module, inputs, direction, options)``, for the forms the planner measures.
Rewrite = Callable[[nn.Module, tuple[torch.Tensor, ...], str, Options], SurgeryResult]
#: A rewritten whole model is kept only when it measured at least this much faster than the original: a gain
#: inside the noise of the measurement is not worth a changed graph, and could be a loss in the next run.
MARGIN = 0.02
#: Models timed on onnxruntime are exported with the TorchScript exporter: 0.03 s for a layer and 0.9 s for
#: ResNet-50, against 0.4 s and 3.5 s with dynamo, for the same onnxruntime kernels after its graph optimizations
#: (``benchmarks/results.md``: the chosen model measured again on dynamo exports). A model it cannot export is
#: exported with dynamo.
TIMING_EXPORTER = "torchscript"
#: A layer or block timed alone is repeated to at least this long per sample (whole models: 20 ms).
SITE_SAMPLE_S = 0.01


def _site_alone(model: nn.Module, site: Site, direction: str, timing: str) -> tuple[nn.Module, torch.Tensor] | None:
    """The site's layer alone, as a model on the value it reads, or None when that cannot be built."""
    if site.input_shape is None or timing == "block-only":
        return None  # (window attention) a function of several layers: timed only within its block or the model
    try:
        layer = copy.deepcopy(model.get_submodule(site.name))
    except AttributeError:
        return None  # a functional site: no module to time alone
    shape = tuple(site.input_shape)
    weight = next(layer.parameters())
    x = torch.randn(shape, dtype=weight.dtype, device=weight.device)  # (on the GPU for a model there)
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


class _Chooser:
    """The per-site and per-block decisions of one ``auto`` run, with the measurements they rest on."""

    def __init__(self, options: Options, work: Path, pairs: int, threads: int, rewrite: Rewrite) -> None:
        self.options, self.work, self.pairs, self.threads, self.rewrite = options, work, pairs, threads, rewrite
        # a block or a layer timed alone: names of the whole model do not apply to it
        self.alone = replace(
            options, exclude=(), leaf_modules=tuple(x for x in options.leaf_modules if not isinstance(x, str))
        )
        self.choices: list[dict[str, Any]] = []
        self.keep: dict[str, list[str]] = {d: [] for d in DIRECTIONS}
        self.cache: dict[tuple, Ratio] = {}
        self.rules = {d: {r.pattern: r for r in rule_set(d, options).rules} for d in DIRECTIONS}

    def timing(self, direction: str, site: Site) -> str:
        """How the site's rule says it is measured (:data:`fxsurgery.engine.rule.TIMINGS`)."""
        return timing_of(self.rules[direction].get(site.pattern))

    def runner(self, module: nn.Module, x: torch.Tensor) -> Callable[[], Any]:
        return runner(module, x, self.options.runtime, self.work, self.threads, exporter=TIMING_EXPORTER)

    def decide(self, direction: str, name: str, chosen: str, **detail: Any) -> None:
        if chosen == "rewritten":
            self.keep[direction].append(name)
        self.choices.append({"site": name, "direction": direction, "chosen": chosen, **detail})

    def measured(self, direction: str, name: str, r: Ratio, **detail: Any) -> None:
        self.decide(
            direction,
            name,
            "rewritten" if r.median < 1.0 else "original",
            **detail,
            ratio=r.median,
            original_ms=r.a_ms,
            rewritten_ms=r.b_ms,
        )

    def ratio(self, key: tuple, module: nn.Module, x: torch.Tensor, direction: str) -> Ratio:
        """``module`` against its rewritten form on ``x`` (measured once per key)."""
        if key not in self.cache:
            form = self.rewrite(module, (x,), direction, self.alone).module
            self.cache[key] = interleaved(
                self.runner(module, x), self.runner(form, x), self.pairs, min_sample_s=SITE_SAMPLE_S, settle=1.0
            )
        return self.cache[key]

    def direction(self, model: nn.Module, inputs: tuple[torch.Tensor, ...], direction: str, res: SurgeryResult) -> None:
        """Decide every rewritten site of ``res``: per block where it has one, else alone."""
        blocks = _blocks(model, [s for s in res.rewritten if self.timing(direction, s) != "alone"])
        grouped = _by_block(blocks)
        captured = capture_submodule_inputs(model, inputs, [b for b in grouped if b])[0] if grouped else {}
        for block, sites in grouped.items():
            r = _measure_block(model, captured.get(block), block, direction, self.ratio)
            for name in sites:
                if r is None:
                    del blocks[name]  # not measurable as a block: per site below
                else:
                    self.measured(direction, name, r, block=block)
        attention = {s.name for s in res.rewritten if owns_children(self.rules[direction].get(s.pattern))}
        followers = []  # an attention's out_proj: rewritten with its attention or not at all
        for site in res.rewritten:
            if site.name in blocks:
                continue
            if "." in site.name and site.name.rsplit(".", 1)[0] in attention:
                followers.append(site.name)
            else:
                self.site(model, site, direction)
        for name in followers:
            parent = name.rsplit(".", 1)[0]
            chosen = next(c["chosen"] for c in self.choices if c["site"] == parent and c["direction"] == direction)
            self.decide(direction, name, chosen, why=f"part of {parent}")

    def site(self, model: nn.Module, site: Site, direction: str) -> None:
        alone = _site_alone(model, site, direction, self.timing(direction, site))
        if alone is None:
            self.decide(
                direction, site.name, "original", why="not measurable alone (a functional site or window attention)"
            )
            return
        original, x = alone
        layer: Any = original[-1] if isinstance(original, nn.Sequential) else original.layer
        key = (
            direction,
            site.pattern,
            type(layer).__name__,
            tuple(p.shape for p in layer.parameters()),
            site.input_shape,
            getattr(layer, "stride", None),
        )
        self.measured(direction, site.name, self.ratio(key, original, x, direction))


def plan_auto(
    model: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    full: dict[str, SurgeryResult],
    options: Options,
    rewrite: Rewrite,
    *,
    pairs: int = 5,
    threads: int = 2,
) -> SurgeryResult:
    """The planner of ``to="auto"`` (see the module docstring): given both passes over the model (``full``), the
    model it chose, with every site (those it left as they were say why) and the measurements in ``timings``. Not
    validated: the pipeline validates it as any pass's result. ``rewrite`` is the pipeline's pass, for the forms it
    measures and the model it composes."""
    with tempfile.TemporaryDirectory(prefix="fxsurgery-auto-") as tmp:
        chooser = _Chooser(options, Path(tmp), pairs, threads, rewrite)
        for direction, res in full.items():
            chooser.direction(model, inputs, direction, res)
        same = _same_as(full, chooser.keep)  # the sites kept are none, or all of one direction: no model to build
        candidates = {
            "auto": None if same else _compose(model, inputs, full, chooser.keep, options, rewrite),
            "all-conv": full["linear_to_conv"].module,
            "all-linear": full["conv_to_linear"].module,
        }
        whole = _time_whole(chooser, model, inputs[0], candidates, same)
    best = min(whole, key=lambda k: whole[k]["ratio"])
    if whole[best]["ratio"] > 1.0 - MARGIN:
        best = "original"
    chosen_module = {"original": working_copy(model), **candidates}[best]
    timings = {
        "runtime": options.runtime,
        "pairs": pairs,
        "threads": threads,
        "sites": chooser.choices,
        "whole_model": whole,
        "chosen": best,
    }
    notes = (
        f"auto ({options.runtime}): chose {best}; whole-model ratios vs original: "
        + ", ".join(f"{k} {v['ratio']:.2f}" for k, v in whole.items()),
    )
    return SurgeryResult(chosen_module, _chosen_sites(full, chooser.keep, best), None, "auto", notes, timings)


def _time_whole(
    chooser: _Chooser, model: nn.Module, x: torch.Tensor, candidates: dict[str, nn.Module | None], same: str | None
) -> dict[str, dict[str, Any]]:
    """Each candidate whole model against the original, side by side; where the per-site choice amounts to another
    candidate (``same``), ``auto`` is that one, measured once (``candidates`` is completed to say so)."""
    base = chooser.runner(model, x)
    whole: dict[str, dict[str, Any]] = {}
    for label, module in candidates.items():
        if module is None:
            continue
        r = interleaved(base, chooser.runner(module, x), chooser.pairs)
        whole[label] = {"ratio": r.median, "low": r.low, "high": r.high, "original_ms": r.a_ms, "candidate_ms": r.b_ms}
    if same:  # measured once, under the other name
        whole["auto"] = {**whole.get(same, {"ratio": 1.0, "low": 1.0, "high": 1.0}), "same_as": same}
        candidates["auto"] = candidates[same] if same in candidates else working_copy(model)
    return {k: whole[k] for k in candidates}  # auto first


def _blocks(model: nn.Module, sites: Sequence[Site]) -> dict[str, str]:
    """Sites decided per block, with their block: the nearest enclosing module with a LayerNorm child of its own (a
    ViT encoder layer, a Swin or ConvNeXt block). Sites outside any such module are decided one by one."""
    out = {}
    for site in sites:
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
    model: nn.Module,
    block_inputs: tuple[torch.Tensor, ...] | None,
    block: str,
    direction: str,
    ratio: Callable[[tuple, nn.Module, torch.Tensor, str], Ratio],
) -> Ratio | None:
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


def _same_as(full: dict[str, SurgeryResult], keep: dict[str, list[str]]) -> str | None:
    """The candidate the per-site choice amounts to, when it is another one: ``original`` (nothing kept),
    ``all-conv`` or ``all-linear`` (every site of one direction kept, none of the other)."""
    kept = {d: set(keep[d]) for d in DIRECTIONS}
    every = {d: {s.name for s in full[d].rewritten} for d in DIRECTIONS}
    if not kept["linear_to_conv"] and not kept["conv_to_linear"]:
        return "original"
    if kept["linear_to_conv"] == every["linear_to_conv"] and not kept["conv_to_linear"]:
        return "all-conv"
    if kept["conv_to_linear"] == every["conv_to_linear"] and not kept["linear_to_conv"]:
        return "all-linear"
    return None


def _compose(
    model: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    full: dict[str, SurgeryResult],
    keep: dict[str, list[str]],
    options: Options,
    rewrite: Rewrite,
) -> nn.Module:
    """Linear -> conv on the kept Linear sites, then conv -> Linear on the kept conv sites of the result."""
    if not keep["linear_to_conv"]:  # one direction only: one pass (a pass that rewrites nothing is not run)
        first: nn.Module = model
        made: list[str] = []
    else:
        drop_l2c = [s.name for s in full["linear_to_conv"].rewritten if s.name not in keep["linear_to_conv"]]
        res = rewrite(model, inputs, "linear_to_conv", replace(options, exclude=(*options.exclude, *drop_l2c)))
        first, made = res.module, [s.name for s in res.rewritten]  # convs that were Linears: not rewritten back
    if not keep["conv_to_linear"]:
        return first
    drop_c2l = [s.name for s in full["conv_to_linear"].rewritten if s.name not in keep["conv_to_linear"]]
    again = replace(options, exclude=(*options.exclude, *drop_c2l, *made))
    return rewrite(first, inputs, "conv_to_linear", again).module


def _chosen_sites(full: dict[str, SurgeryResult], keep: dict[str, list[str]], best: str) -> list[Site]:
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
                s = dataclasses.replace(
                    s,
                    status="skipped",
                    reason=f"auto: the original form is faster ({best})",
                    subgraph=subgraph.left_alone(s.subgraph),
                )
            sites.append(dataclasses.replace(s, direction=direction))
    return sites
