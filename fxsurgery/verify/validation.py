"""Numerical validation of a rewrite against the original model, under :mod:`~fxsurgery.verify.policy`.

``precision="float64"`` ("prove" mode) runs both models in float64, where a correct rewrite agrees to ~1e-14 of the
output scale, so it shows that a rewrite is exact and not merely close.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn

from fxsurgery.errors import InputError, one_line
from fxsurgery.options import Precision
from fxsurgery.report import Validation
from fxsurgery.tracing.copies import eval_copy
from fxsurgery.verify.policy import SCALE_FLOOR, Errors, compare_outputs

log = logging.getLogger(__name__)

__all__ = ["validate", "random_inputs", "run_no_grad"]

_CONSTANT_NOTE = ("the original's outputs do not depend on the input ({which} the same on every validation input, "
                  "e.g. a zero-initialised head such as torchvision's ViT before training, or a Linear with zero "
                  "weights): this comparison cannot see the rewritten sites that feed {them}; validate with trained "
                  "or randomised weights")  # fmt: skip


def random_inputs(example: Sequence[torch.Tensor], generator: torch.Generator, batch: int | None = None) -> tuple:
    """Fresh inputs like ``example`` (same dtype, device, value range); dim 0 resized to ``batch`` when given."""
    n0 = example[0].shape[0] if example[0].dim() else None
    out = []
    for t in example:
        shape = list(t.shape)
        if batch is not None and t.dim() and shape[0] == n0:
            shape[0] = batch
        r = _like(t, shape, generator).to(dtype=t.dtype, device=t.device)
        if t.is_contiguous(memory_format=torch.channels_last) and t.dim() == 4 and not t.is_contiguous():
            r = r.contiguous(memory_format=torch.channels_last)
        out.append(r)
    return tuple(out)


def _like(t: torch.Tensor, shape: list[int], generator: torch.Generator) -> torch.Tensor:
    if t.is_floating_point():
        src = t.detach().double()
        std = float(src.std()) if src.numel() > 1 else 1.0
        std = std if math.isfinite(std) and std > 0 else 1.0
        mean = float(src.mean()) if src.numel() else 0.0
        mean = mean if math.isfinite(mean) else 0.0
        return torch.randn(shape, generator=generator, dtype=torch.float64) * std + mean
    if t.dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=generator).bool()
    if t.is_complex():
        return torch.randn(shape, generator=generator, dtype=t.dtype)
    lo = int(t.min()) if t.numel() else 0
    hi = int(t.max()) if t.numel() else 1
    if _padding_mask(t):  # an attention mask: ones then zeros per sequence, never empty
        lengths = torch.randint(1, shape[-1] + 1, (*shape[:-1], 1), generator=generator)
        return (torch.arange(shape[-1]) < lengths).to(t.dtype)
    return torch.randint(lo, hi + 1, shape, generator=generator)


def _padding_mask(t: torch.Tensor) -> bool:
    """0/1 integers whose every row (last dim) is ones then zeros, with at least one one: a padding mask, for which
    independent random bits would mask whole sequences (where runtimes differ on what an empty softmax gives)."""
    if t.dim() < 2 or t.numel() == 0 or not bool(((t == 0) | (t == 1)).all()):
        return False
    return bool((t[..., 0] == 1).all() and (t[..., 1:] <= t[..., :-1]).all())


def run_no_grad(model: nn.Module, inputs: Sequence[torch.Tensor]) -> Any:
    """``model`` on clones of ``inputs`` (so a model that writes to its input cannot change them), without grad."""
    with torch.no_grad():
        return model(*[t.clone() for t in inputs])


def _cast(inputs: Sequence[torch.Tensor], precision: Precision) -> tuple:
    if precision != "float64":
        return tuple(inputs)
    return tuple(_wide(t) for t in inputs)


def _wide(t: torch.Tensor) -> torch.Tensor:
    if t.is_complex():
        return t.to(torch.complex128)
    return t.double() if t.is_floating_point() else t


def _floating_leaves(outputs: Any) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(outputs) if isinstance(t, torch.Tensor) and t.is_floating_point()]


def input_independent(refs: list[Any]) -> list[int]:
    """Indices of the floating outputs that are the same whatever the input: equal on every validation input of the
    example's shape or, with one such input, equal for every sample of its batch."""
    leaves = [_floating_leaves(r) for r in refs]
    same_shape = [ls for ls in leaves if [t.shape for t in ls] == [t.shape for t in leaves[0]]]
    out = []
    for i, t in enumerate(leaves[0]):
        if t.numel() == 0:
            continue
        if len(same_shape) > 1:
            fixed = all(torch.equal(t, other[i]) for other in same_shape[1:])
        else:
            fixed = t.dim() > 0 and t.shape[0] > 1 and bool((t == t[:1]).all())
        if fixed:
            out.append(i)
    return out


def _independence_note(refs: list[Any]) -> str | None:
    fixed = input_independent(refs)
    if not fixed:
        return None
    n = len(_floating_leaves(refs[0]))
    which = "every output is" if len(fixed) == n else f"output{'s' if len(fixed) > 1 else ''} {fixed} of {n}"
    return _CONSTANT_NOTE.format(which=which, them="them" if len(fixed) == n else "those outputs")


def _batches(orig: nn.Module, example: Sequence[torch.Tensor], num_random: int, precision: Precision, seed: int,
             notes: list[str]) -> tuple[list[tuple], set[int]]:  # fmt: skip
    """The example inputs, ``num_random`` fresh ones, and one at another batch size when the original takes it."""
    gen = torch.Generator().manual_seed(seed)
    batches = [_cast(example, precision)] + [_cast(random_inputs(example, gen), precision) for _ in range(num_random)]
    if not example[0].dim():
        return batches, set()
    n = int(example[0].shape[0])
    other = _cast(random_inputs(example, gen, batch=n + 1 if n > 1 else 2), precision)
    try:
        run_no_grad(orig, other)
    except Exception as e:
        notes.append(f"batch axis is not free (the original rejects batch {other[0].shape[0]}: {e})"[:300])
        return batches, {n}
    return batches + [other], {n, int(other[0].shape[0])}


def validate(
    original: nn.Module,
    rewritten: nn.Module,
    example_inputs: Sequence[torch.Tensor],
    *,
    num_random: int = 2,
    precision: Precision = "native",
    rtol: float | None = None,
    seed: int = 0,
    original_copy: nn.Module | None = None,
) -> Validation:
    """Run ``original`` and ``rewritten`` (as eval-mode copies, without grad) on the example inputs, ``num_random``
    fresh inputs and, where the batch axis is free, another batch size; compare under the tolerance policy.
    ``original_copy`` is an eval copy of ``original`` made before (it is reused, not copied again)."""
    orig = original_copy if original_copy is not None else eval_copy(original, precision)
    rew = eval_copy(rewritten, precision)
    notes: list[str] = []
    batches, batch_sizes = _batches(orig, example_inputs, num_random, precision, seed, notes)
    histograms: dict[str, list[int]] = {}
    errors = Errors(histograms=histograms)
    refs = []
    for k, inputs in enumerate(batches):
        label = "example input" if k == 0 else f"input #{k}"
        try:
            ref = run_no_grad(orig, inputs)
        except Exception as e:
            if k == 0:
                where = " in float64 (use precision='native')" if precision == "float64" else ""
                raise InputError(f"the original model fails on the example inputs{where}: {one_line(e)}") from e
            notes.append(f"{label} skipped: the original model fails on it: {type(e).__name__}: {e}"[:300])
            continue
        try:
            got = run_no_grad(rew, inputs)
        except Exception as e:
            errors.fail(label, f"the rewritten model fails where the original runs: {type(e).__name__}: {e}")
            break
        errors.prefix = label  # the histograms pool every input's elements per output
        compare_outputs(ref, got, rtol=rtol, label=f"{label} output", errors=errors)
        refs.append(ref)
    note = _independence_note(refs) if refs and not errors.failure else None
    if note:
        notes.append(note)
        log.warning("validation: %s", note)
    return Validation(passed=not errors.failure, max_abs_error=errors.max_abs, max_rel_error=errors.max_rel,
                      rtol=errors.rtol if errors.rtol else (rtol or 0.0), scale_floor=SCALE_FLOOR,
                      num_inputs=len(batches), batch_sizes=tuple(sorted(batch_sizes)), precision=precision,
                      worst=errors.worst, failure=errors.failure, notes=tuple(notes),
                      error_histograms=histograms)  # fmt: skip
