"""Numerical validation of a rewrite against the original model, under :mod:`~fxsurgery.verify.policy`.

``precision="float64"`` ("prove" mode) runs both models in float64, where a correct rewrite agrees to ~1e-14 of the
output scale, so it shows that a rewrite is exact and not merely close.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx
from torch import nn

from fxsurgery._runtime import OutsideExportedRange
from fxsurgery.capture.copies import eval_copy, widen_casts
from fxsurgery.errors import InputError, one_line
from fxsurgery.report import Validation
from fxsurgery.verify.notes import floor_warning, independence_note
from fxsurgery.verify.policy import (
    HALF,
    SCALE_FLOOR,
    Errors,
    compare_outputs,
    floating_leaves,
    full_float32,
    half_tolerance,
    tf32_note,
)

if TYPE_CHECKING:
    from fxsurgery.options import Precision

log = logging.getLogger(__name__)

__all__ = ["validate", "random_inputs", "run_no_grad", "kept_state", "identical_values"]


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
    """``model`` on clones of ``inputs`` (so a model that writes to its input cannot change them), without grad, in
    full float32 (:func:`~fxsurgery.verify.policy.full_float32`)."""
    with torch.no_grad(), full_float32():
        return model(*[t.clone() for t in inputs])


def identical_values(original: nn.Module, rewritten: nn.Module, inputs: Sequence[torch.Tensor]) -> str:
    """How many output values of ``rewritten`` equal ``original``'s bit for bit on ``inputs``, said in words."""
    ref, got = (floating_leaves(run_no_grad(m, inputs)) for m in (original, rewritten))
    if len(ref) != len(got) or any(a.shape != b.shape for a, b in zip(ref, got)):
        return "the outputs differ in structure"
    same = sum(int((a == b).sum()) for a, b in zip(ref, got))
    total = sum(a.numel() for a in ref)
    return "the outputs are bit-identical" if same == total else f"{same} of {total} output values are bit-identical"


def _float32(t: torch.Tensor) -> torch.Tensor:
    """A float16/bfloat16 tensor as float32 (a half-precision model's inputs and weights, for its float32 run)."""
    return t.float() if t.dtype in HALF else t


def _cast(inputs: Sequence[torch.Tensor], precision: Precision) -> tuple:
    if precision != "float64":
        return tuple(inputs)
    return tuple(_wide(t) for t in inputs)


def _wide(t: torch.Tensor) -> torch.Tensor:
    if t.is_complex():
        return t.to(torch.complex128)
    return t.double() if t.is_floating_point() else t


def _batches(
    orig: nn.Module, example: Sequence[torch.Tensor], num_random: int, precision: Precision, seed: int, notes: list[str]
) -> tuple[list[tuple], tuple | None]:
    """The example inputs, ``num_random`` fresh ones and, when the original takes another batch size, one at the next
    size and one at batch 1, the edge of what a graph traced at a larger batch may admit (the probe runs the original
    once, and its state is put back: both sides then start from the same state). Last, the input at batch 2 to run
    instead where the rewritten graph refuses batch 1 (torch.export traced it for batch sizes from 2)."""
    gen = torch.Generator().manual_seed(seed)
    batches = [_cast(example, precision)] + [_cast(random_inputs(example, gen), precision) for _ in range(num_random)]
    if not example[0].dim():
        return batches, None
    n = int(example[0].shape[0])
    other = _cast(random_inputs(example, gen, batch=n + 1 if n > 1 else 2), precision)
    with kept_state(orig):
        try:
            run_no_grad(orig, other)
        except Exception as e:
            notes.append(f"batch axis is not free (the original rejects batch {other[0].shape[0]}: {e})"[:300])
            return batches, None
    batches.append(other)
    if n > 1:
        batches.append(_cast(random_inputs(example, gen, batch=1), precision))
    two = _cast(random_inputs(example, gen, batch=2), precision) if n > 2 else None
    return batches, two


@contextmanager
def kept_state(module: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Run ``module`` in the block and put its buffers back as they were (a probe must not advance a counter or a
    running statistic that the comparison then reads); the block gets the buffers as they were, by name."""
    saved = {name: b.detach().clone() for name, b in module.named_buffers()}
    try:
        yield saved
    finally:
        with torch.no_grad():
            for name, b in module.named_buffers():
                if name in saved and b.shape == saved[name].shape and not torch.equal(b, saved[name]):
                    b.copy_(saved[name])  # (only what changed: a buffer expanded from one row cannot be written)


def _comparable_state(orig: nn.Module, rew: nn.Module) -> tuple[list[str], list[str]]:
    """The buffers both models hold under one name, shape and dtype: what a forward leaves behind and the comparison
    reads (a running statistic, a step counter, a cache). First those the rewritten module can update (a graph reads
    them, or a module with a forward of its own holds them), then those it cannot: torch.export captured a copy of
    its own of a tensor the forward writes through another reference (a static KV cache's tensors, lifted as
    constants), and the buffer itself is never read."""
    theirs = dict(rew.named_buffers())
    common = [
        name
        for name, b in orig.named_buffers()
        if name in theirs and theirs[name].shape == b.shape and theirs[name].dtype == b.dtype
    ]
    live = _reachable_buffers(rew)
    return [n for n in common if n in live], [n for n in common if n not in live]


def _reachable_buffers(module: nn.Module) -> set[str]:
    """Buffers a graph of ``module`` reads (``get_attr``) or a module with its own forward holds."""
    names: set[str] = set()
    for prefix, sub in module.named_modules():
        dot = f"{prefix}." if prefix else ""
        if isinstance(sub, fx.GraphModule):
            names |= {f"{dot}{n.target}" for n in sub.graph.nodes if n.op == "get_attr"}
        else:
            names |= {f"{dot}{name}" for name, _ in sub.named_buffers(recurse=False)}
    return names


def _unfollowed(orig: nn.Module, names: list[str], before: dict[str, torch.Tensor]) -> str | None:
    """A note on the buffers of ``names`` the original's forwards changed, which the rewritten graph never reads."""
    buffers = dict(orig.named_buffers())
    moved = [n for n in names if n in before and n in buffers and not torch.equal(buffers[n], before[n])]
    if not moved:
        return None
    shown = ", ".join(moved[:3]) + (f" and {len(moved) - 3} more" if len(moved) > 3 else "")
    return (
        f"the original's forward changes {shown}, which the graph holds no reference to (torch.export captured "
        "the tensors the forward writes as constants of its own, a static KV cache's for one): the rewritten "
        "module updates those copies, and its buffers of these names stay as they were"
    )


def _run(model: nn.Module, inputs: Sequence[torch.Tensor], state: list[str]) -> tuple[Any, dict[str, Any]]:
    """The outputs of ``model`` on clones of ``inputs``, and what the forward left behind: the buffers named in
    ``state`` and the input clones (a forward that writes to its input)."""
    clones = [t.clone() for t in inputs]
    with torch.no_grad(), full_float32():
        out = model(*clones)
    buffers = dict(model.named_buffers())
    after = {f"buffer {name}": buffers[name].detach().clone() for name in state if name in buffers}
    after.update({f"input {i}": t for i, t in enumerate(clones)})
    return out, after


@dataclass
class _Comparison:
    """Both sides of one validation and what it found: the outputs compared into ``errors``, what each forward left
    behind (buffers, inputs written to) into ``state_errors``."""

    orig: nn.Module
    rew: nn.Module
    state: list[str]
    rtol: float | None
    precision: Precision
    errors: Errors
    state_errors: Errors = field(default_factory=Errors)
    notes: list[str] = field(default_factory=list)
    refs: list[Any] = field(default_factory=list)
    half: torch.dtype | None = None  # the dtype a half-precision original computes in
    float32_copy: nn.Module | None = None  # made where an output is outside the half type's tolerance
    half_noted: bool = False

    def run(self, k: int, inputs: tuple) -> str:
        """One validation input through both sides: "ok", "skipped" (the original fails on it), "refused" (outside
        the sizes the rewritten graph admits, as torch.export traced it) or "stop" (the rewritten model fails)."""
        label = "example input" if k == 0 else f"input #{k}"
        try:
            ref, ref_state = _run(self.orig, inputs, self.state)
        except Exception as e:
            if k == 0:
                where = " in float64 (use precision='native')" if self.precision == "float64" else ""
                raise InputError(f"the original model fails on the example inputs{where}: {one_line(e)}") from e
            self.notes.append(f"{label} skipped: the original model fails on it: {type(e).__name__}: {e}"[:300])
            return "skipped"
        try:
            got, got_state = _run(self.rew, inputs, self.state)
        except OutsideExportedRange as e:
            if k == 0:  # the example itself: the graph was traced on it, so this refusal is a failure
                self.errors.fail(label, f"the rewritten model refuses the example inputs: {one_line(e)}")
                return "stop"
            self.notes.append(
                f"{label} (batch {inputs[0].shape[0]}) is outside the sizes torch.export traced the "
                "model for: the rewritten graph refuses it, with a clear error"
            )
            return "refused"
        except Exception as e:
            self.errors.fail(label, f"the rewritten model fails where the original runs: {type(e).__name__}: {e}")
            return "stop"
        self.errors.prefix = label  # the histograms pool every input's elements per output
        rtol = self.rtol
        if rtol is None and self.half is not None:
            rtol, note = half_tolerance(ref, got, self.half, lambda: self._float32_run(inputs))
            if note and not self.half_noted:
                self.notes.append(f"{label}: {note}")
                self.half_noted = True
        compare_outputs(ref, got, rtol=rtol, label=f"{label} output", errors=self.errors)
        for name, value in ref_state.items():
            compare_outputs(
                value,
                got_state[name],
                rtol=self.rtol,
                label=f"{label}: {name} after the forward",
                errors=self.state_errors,
            )
        self.refs.append(ref)
        return "ok"

    def _float32_run(self, inputs: tuple) -> Any:
        """The original's outputs on ``inputs`` computed in float32 (its copy made once)."""
        if self.float32_copy is None:
            self.float32_copy = eval_copy(self.orig)._apply(_float32)
        return run_no_grad(self.float32_copy, [_float32(t) for t in inputs])

    def result(self) -> Errors:
        """The outputs' errors, failing with the state's first failure where the outputs passed."""
        errors, state = self.errors, self.state_errors
        if state.failure and not errors.failure:
            errors.fail(state.worst, state.failure[len(state.worst) + 2 :])
        errors.max_abs, errors.max_rel = max(errors.max_abs, state.max_abs), max(errors.max_rel, state.max_rel)
        return errors


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
    fresh inputs and, where the batch axis is free, another batch size; compare under the tolerance policy the
    outputs and the state each forward leaves behind (buffers of the same name, shape and dtype in both, and inputs
    a forward writes to). Both sides run the same inputs in the same order from the same state. In float64, two
    graphs (a captured program and its rewrite) run with their casts to a narrower float widened (``widen_casts``).
    ``original_copy`` is an eval copy of ``original`` made before (it is reused, not copied again)."""
    orig = original_copy if original_copy is not None else eval_copy(original, precision)
    rew = eval_copy(rewritten, precision)
    if precision == "float64" and isinstance(orig, fx.GraphModule) and isinstance(rew, fx.GraphModule):
        for graph in (orig, rew):  # two graphs of one program: their casts at the capture's dtype too
            widen_casts(graph)
    histograms: dict[str, list[int]] = {}
    live, loose = _comparable_state(orig, rew)
    with kept_state(orig) as before:  # a copy reused by the caller starts the next comparison where this one started
        notes: list[str] = []
        batches, two = _batches(orig, example_inputs, num_random, precision, seed, notes)
        run = _Comparison(orig, rew, live, rtol, precision, Errors(histograms=histograms), notes=notes)
        if precision == "native":
            run.half = next((p.dtype for p in orig.parameters() if p.dtype in HALF), None)
        batch_sizes: set[int] = set()  # those compared
        for k, inputs in enumerate(batches):
            outcome = run.run(k, inputs)
            if outcome == "refused" and two is not None:  # the lowest batch the graph admits, 2: the edge instead
                inputs, outcome = two, run.run(len(batches), two)
            if outcome in ("ok", "stop") and inputs[0].dim():
                batch_sizes.add(int(inputs[0].shape[0]))
            if outcome == "stop":
                break
        unfollowed = _unfollowed(orig, loose, before)
        if unfollowed:
            notes.append(unfollowed)
    errors, refs = run.result(), run.refs
    note = independence_note(refs) if refs and not errors.failure else None
    if note:
        notes.append(note)
        log.warning("validation: %s", note)
    note = tf32_note([*example_inputs, *original.parameters()])
    if note:
        notes.append(note)
    warning = floor_warning(refs, errors.rtol or rtol or 0.0) if not errors.failure else ""
    if warning:
        log.warning("validation: %s", warning)
    return Validation(
        passed=not errors.failure,
        max_abs_error=errors.max_abs,
        max_rel_error=errors.max_rel,
        rtol=errors.rtol if errors.rtol else (rtol or 0.0),
        scale_floor=SCALE_FLOOR,
        num_inputs=len(batches),
        batch_sizes=tuple(sorted(batch_sizes)),
        precision=precision,
        worst=errors.worst,
        failure=errors.failure,
        notes=tuple(notes),
        error_histograms=histograms,
        warning=warning,
    )
