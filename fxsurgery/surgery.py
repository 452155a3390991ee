"""The public passes: :func:`linear_to_conv` and :func:`conv_to_linear`.

Each traces the model, copies its structure (parameters stay views of the original storage), propagates shapes with
fake tensors, applies its rule set, validates the result numerically and returns a :class:`SurgeryResult`. The
user's model, its buffers and the example inputs are never modified.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from fxsurgery import validation as _validation
from fxsurgery.checkpoint import META_KEY as LAYOUTS_KEY
from fxsurgery.errors import InputError, SurgeryError, TraceError, ValidationError
from fxsurgery.result import Site, SurgeryResult
from fxsurgery.rules import RULES, Rewriter, Rule
from fxsurgery.tracing import LeafSpec, normalize_inputs, prepare_model, propagate_shapes, trace, working_copy

__all__ = ["linear_to_conv", "conv_to_linear", "rewrite"]

log = logging.getLogger(__name__)

DIRECTIONS = {"conv": "linear_to_conv", "linear": "conv_to_linear"}


def linear_to_conv(
    model: nn.Module,
    example_inputs: torch.Tensor | tuple[torch.Tensor, ...],
    *,
    validate: bool = True,
    leaf_modules: LeafSpec = (),
    exclude: Sequence[str] = (),
    precision: _validation.Precision = "native",
    rtol: float | None = None,
    num_random: int = 2,
    seed: int = 0,
    batch_layout: str = "spatial",
    token_layout: bool = False,
) -> SurgeryResult:
    """Rewrite Linear layers on flattened or pooled feature maps (and their chains) as Conv2d layers.

    ``leaf_modules``: module types or qualified names that torch.fx should not trace into. ``exclude``: site names to
    leave alone. ``precision="float64"`` validates in float64 to prove exactness. ``rtol`` overrides the per-dtype
    tolerance. ``batch_layout``: ``"spatial"`` (default) carries the rewritten head as ``(1, C, 1, N)``, the batch
    side by side on the width axis, so each conv is one matrix product; ``"batch"`` keeps ``(N, C, 1, 1)`` (N small
    products: several times slower at batch > 1 in onnxruntime). ``token_layout=True`` (opt-in) also carries
    transformer activations in conv layouts: tokens ``(B, S, C)`` as ``(B, C, 1, S)`` (ViT, MLP-Mixer channel MLPs,
    ``nn.MultiheadAttention`` self-attention) and channels-last ``(N, H, W, C)`` maps as NCHW (Swin), from the
    LayerNorm that starts a block, so every Linear in the block is a 1x1 conv. Raises
    :class:`~fxsurgery.ValidationError` when outputs differ beyond tolerance.
    """
    return rewrite(model, example_inputs, "linear_to_conv", validate=validate, leaf_modules=leaf_modules,
                   exclude=exclude, precision=precision, rtol=rtol, num_random=num_random, seed=seed,
                   batch_layout=batch_layout, token_layout=token_layout)  # fmt: skip


def conv_to_linear(
    model: nn.Module,
    example_inputs: torch.Tensor | tuple[torch.Tensor, ...],
    *,
    validate: bool = True,
    leaf_modules: LeafSpec = (),
    exclude: Sequence[str] = (),
    precision: _validation.Precision = "native",
    rtol: float | None = None,
    num_random: int = 2,
    seed: int = 0,
) -> SurgeryResult:
    """Rewrite pointwise (1x1, also strided), full-extent and 1-D kernel-1 convolutions as Linear layers.

    Arguments as for :func:`linear_to_conv`.
    """
    return rewrite(model, example_inputs, "conv_to_linear", validate=validate, leaf_modules=leaf_modules,
                   exclude=exclude, precision=precision, rtol=rtol, num_random=num_random, seed=seed)  # fmt: skip


def rewrite(
    model: nn.Module,
    example_inputs: Any,
    direction: str,
    *,
    validate: bool = True,
    leaf_modules: LeafSpec = (),
    exclude: Sequence[str] = (),
    precision: _validation.Precision = "native",
    rtol: float | None = None,
    num_random: int = 2,
    seed: int = 0,
    batch_layout: str = "spatial",
    token_layout: bool = False,
    runtime: str = "onnxruntime",
) -> SurgeryResult:
    """Run one direction (``"linear_to_conv"`` or ``"conv_to_linear"``; ``"conv"``/``"linear"`` name the target), or
    ``"auto"``: per site the faster form, measured on ``runtime`` (``"onnxruntime"`` or ``"torch"``), see
    :mod:`fxsurgery.auto`."""
    direction = DIRECTIONS.get(direction, direction)
    if direction == "auto":
        from fxsurgery.auto import auto_rewrite

        inputs = normalize_inputs(example_inputs)
        kwargs = dict(leaf_modules=leaf_modules, exclude=exclude, precision=precision, rtol=rtol,
                      num_random=num_random, seed=seed, batch_layout=batch_layout,
                      token_layout=token_layout)  # fmt: skip
        return auto_rewrite(prepare_model(model), inputs, runtime=runtime, rewrite=rewrite, validate=validate,
                            rewrite_kwargs=kwargs)  # fmt: skip
    if direction not in RULES:
        raise InputError(f"unknown direction {direction!r}; use one of {sorted(RULES)} (or 'conv' / 'linear' / 'auto')")
    options = {"batch_layout": batch_layout, "token_layout": token_layout} if direction == "linear_to_conv" else {}
    make_rule = functools.partial(RULES[direction], **options)
    make_rule()  # check the options before any work
    if precision not in ("native", "float64"):
        raise InputError(f"precision must be 'native' or 'float64', got {precision!r}")
    if isinstance(exclude, str):
        exclude = (exclude,)
    inputs = normalize_inputs(example_inputs)
    model = prepare_model(model)
    if validate and any(p.device.type == "meta" for p in model.parameters()):
        raise InputError("the model's parameters are on the meta device and hold no values; pass validate=False")
    log.info("tracing %s", type(model).__name__)
    gm, sites, notes = _rewrite_structure(model, inputs, make_rule, leaf_modules, exclude)
    result = SurgeryResult(gm, sites, None, direction, tuple(notes))
    if not validate:
        return result
    log.info("validating %d rewritten sites", len(result.rewritten))
    original = _validation.eval_copy(model, precision)
    check = _validation.validate(model, gm, inputs, num_random=num_random, precision=precision, rtol=rtol,
                                 seed=seed, original_copy=original)  # fmt: skip
    result = SurgeryResult(gm, sites, check, direction, tuple(notes))
    if not check:
        culprits = _find_culprits(model, inputs, make_rule, leaf_modules, exclude, result, original, precision, rtol,
                                  seed)  # fmt: skip
        named = ", ".join(f"{s.name} ({s.pattern})" for s in culprits) or "the combination of rewritten sites"
        raise ValidationError(
            f"validation failed: {check.failure}; responsible: {named}. Exclude the site with exclude=[...] and "
            "report the model",
            result=result,
            sites=tuple(s.name for s in culprits),
        )
    return result


def _apply(
    traced: fx.GraphModule, inputs: tuple[torch.Tensor, ...], make_rule: Callable[[], Rule], exclude: Sequence[str]
) -> tuple[fx.GraphModule, list[Site]]:
    gm = working_copy(traced)
    gm.train(traced.training)
    propagate_shapes(gm, inputs)
    try:
        sites = Rewriter(gm, exclude).run(make_rule())
    except SurgeryError:
        raise
    except Exception as e:
        raise SurgeryError(f"internal error while rewriting ({type(e).__name__}: {e}); please report it") from e
    return gm, sites


_MAX_DEPTH = 8
_MAX_AUTO_LEAVES = 64


def _rewrite_structure(
    model: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    make_rule: Callable[[], Rule],
    leaf_modules: LeafSpec,
    exclude: Sequence[str],
    depth: int = 0,
) -> tuple[nn.Module, list[Site], list[str]]:
    """Trace and rewrite ``model``; where fx cannot trace, rewrite inside the largest submodules that do trace.

    A submodule that fails to trace becomes a leaf of the graph and is itself rewritten the same way, with the inputs
    it receives on the example inputs. If the root's own forward cannot be traced, its children are rewritten in a
    copy of the root (then the returned module is that copy, not a GraphModule). Notes say what was left untouched.
    """
    notes: list[str] = []
    auto: list[str] = []
    while True:
        try:
            traced = trace(model, (*leaf_modules, *auto), n_inputs=len(inputs))
            break
        except TraceError as e:
            where = e.module or ""
            if depth >= _MAX_DEPTH:
                raise
            if where and where not in auto and len(auto) < _MAX_AUTO_LEAVES:
                auto.append(where)
                notes.append(f"{where} ({type(model.get_submodule(where)).__name__}) cannot be traced "
                             f"({_cause(e)}); kept as a leaf and rewritten inside")  # fmt: skip
                continue
            if where or not list(model.children()):
                raise
            return _descend_root(model, inputs, make_rule, leaf_modules, exclude, depth, e)
    gm, sites = _apply(traced, inputs, make_rule, exclude)
    if auto:
        _rewrite_children(gm, model, auto, inputs, make_rule, leaf_modules, exclude, depth, sites, notes)
    return gm, sites, notes


def _descend_root(
    model: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    make_rule: Callable[[], Rule],
    leaf_modules: LeafSpec,
    exclude: Sequence[str],
    depth: int,
    error: TraceError,
) -> tuple[nn.Module, list[Site], list[str]]:
    root = working_copy(model)
    notes = [f"the forward of {type(model).__name__} cannot be traced ({_cause(error)}); its own code is left as "
             "it is and its submodules are rewritten one by one"]  # fmt: skip
    sites: list[Site] = []
    names = [name for name, _ in model.named_children()]
    if not _rewrite_children(root, model, names, inputs, make_rule, leaf_modules, exclude, depth, sites, notes):
        raise error  # no child could be rewritten either: the original error says the most
    return root, sites, notes


def _rewrite_children(
    target: nn.Module,
    source: nn.Module,
    names: Sequence[str],
    inputs: tuple[torch.Tensor, ...],
    make_rule: Callable[[], Rule],
    leaf_modules: LeafSpec,
    exclude: Sequence[str],
    depth: int,
    sites: list[Site],
    notes: list[str],
) -> int:
    """Rewrite each submodule ``names`` of ``target`` (a copy of ``source``) with the inputs it gets in ``source``;
    returns how many were rewritten (the others are noted as untouched)."""
    captured, skipped = capture_submodule_inputs(source, inputs, names)
    for name, why in skipped.items():
        notes.append(f"{name} left untouched: {why}")
    done = 0
    for name, sub_inputs in captured.items():
        prefix = f"{name}."
        sub_exclude = [e.removeprefix(prefix) for e in exclude if e.startswith(prefix)]
        sub_leaves = [x.removeprefix(prefix) if isinstance(x, str) else x for x in leaf_modules
                      if not isinstance(x, str) or x.startswith(prefix)]  # fmt: skip
        try:
            new, sub_sites, sub_notes = _rewrite_structure(target.get_submodule(name), sub_inputs, make_rule,
                                                           sub_leaves, sub_exclude, depth + 1)  # fmt: skip
        except SurgeryError as e:
            notes.append(f"{name} left untouched: {_cause(e)}")
            continue
        done += 1
        target.set_submodule(name, new)
        sites += [dataclasses.replace(s, name=prefix + s.name) for s in sub_sites]
        notes += [f"{prefix}{n}" for n in sub_notes]
        for key, layout in getattr(new, "meta", {}).get(LAYOUTS_KEY, {}).items():
            if not isinstance(getattr(target, "meta", None), dict):
                target.meta = {}  # type: ignore[assignment]
            target.meta.setdefault(LAYOUTS_KEY, {})[prefix + key] = layout  # type: ignore[union-attr]
    return done


def capture_submodule_inputs(
    model: nn.Module, inputs: tuple[torch.Tensor, ...], names: Sequence[str]
) -> tuple[dict[str, tuple[torch.Tensor, ...]], dict[str, str]]:
    """The positional tensor inputs each submodule ``names`` receives when ``model`` runs on ``inputs`` (one real
    run of an eval-mode copy), and why the others cannot be captured."""
    probe = _validation.eval_copy(model, "native")
    calls: dict[str, list[tuple[tuple, dict]]] = {n: [] for n in names}
    handles = []
    for name in names:
        def hook(mod: nn.Module, args: tuple, kwargs: dict, name: str = name) -> None:
            calls[name].append((args, kwargs))

        handles.append(probe.get_submodule(name).register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            probe(*[t.clone() for t in inputs])
    except Exception as e:
        raise TraceError(f"the model fails on the example inputs: {type(e).__name__}: {e}") from e
    finally:
        for h in handles:
            h.remove()
    captured, skipped = {}, {}
    for name, seen in calls.items():
        if not seen:
            skipped[name] = "not called on the example inputs"
        elif len(seen) > 1:
            skipped[name] = f"called {len(seen)} times (a shared module)"
        elif seen[0][1] or not seen[0][0] or not all(isinstance(a, torch.Tensor) for a in seen[0][0]):
            skipped[name] = "called with keyword or non-tensor arguments"
        else:
            captured[name] = tuple(a.detach().clone() for a in seen[0][0])
    return captured, skipped


def _cause(e: BaseException) -> str:
    return e.cause if isinstance(e, TraceError) else str(e)


def _find_culprits(
    model: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    make_rule: Callable[[], Rule],
    leaf_modules: LeafSpec,
    exclude: Sequence[str],
    result: SurgeryResult,
    original: nn.Module,
    precision: _validation.Precision,
    rtol: float | None,
    seed: int,
) -> list[Site]:
    """Rewrite each site alone and keep those whose single-site model fails validation, worst first."""
    rewritten = result.rewritten
    if len(rewritten) == 1:
        return rewritten
    scored: list[tuple[float, Site]] = []
    for site in rewritten:
        others = [s.name for s in rewritten if s is not site]
        gm, _, _ = _rewrite_structure(model, inputs, make_rule, leaf_modules, [*exclude, *others])
        check = _validation.validate(original, gm, inputs, num_random=0, precision=precision, rtol=rtol,
                                     seed=seed, original_copy=original)  # fmt: skip
        if not check:
            scored.append((check.max_rel_error, site))
    scored.sort(key=lambda p: -p[0])
    return [s for _, s in scored]
