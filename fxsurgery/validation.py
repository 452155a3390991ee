"""Numerical validation of a rewrite against the original model.

Tolerance policy (documented in the README): for each output tensor, with ``ref`` the original's output,

    max|rewritten - ref|  <=  rtol[dtype] * max(max|ref|, SCALE_FLOOR)

i.e. errors are measured relative to the magnitude of the output, not element by element (a Linear and a 7x7 conv
sum the same 25088 products in a different order; their float32 results differ by ~3e-5 at |y| ~ 45, far above
torch.testing's per-element defaults yet a ~1e-6 fraction of the output scale). Integer and boolean outputs must be
equal. ``precision="float64"`` ("prove" mode) runs both models in float64, where a correct rewrite agrees to ~1e-14 of
the output scale, so it shows that a rewrite is exact and not merely close.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.utils._pytree as pytree
from torch import nn

from fxsurgery.errors import InputError
from fxsurgery.tracing import working_copy

log = logging.getLogger(__name__)

__all__ = ["RTOL", "SCALE_FLOOR", "Validation", "validate", "compare_outputs", "random_inputs"]

#: Relative tolerance per output dtype, against the output's largest magnitude.
RTOL: dict[torch.dtype, float] = {
    torch.float64: 1e-10,
    torch.float32: 1e-4,
    torch.float16: 5e-3,
    torch.bfloat16: 3e-2,
}
#: Outputs smaller than this in magnitude are compared as if they were this large.
SCALE_FLOOR = 1e-3

Precision = Literal["native", "float64"]


@dataclass(frozen=True)
class Validation:
    """Outcome of comparing a rewritten model with its original; truthy when it passed."""

    passed: bool
    max_abs_error: float
    max_rel_error: float
    rtol: float
    scale_floor: float
    num_inputs: int
    batch_sizes: tuple[int, ...]
    precision: str
    worst: str = ""
    failure: str = ""
    notes: tuple[str, ...] = field(default=())

    def __bool__(self) -> bool:
        return self.passed

    def summary(self) -> str:
        verdict = "PASSED" if self.passed else "FAILED"
        text = (
            f"validation {verdict} ({self.precision}): {self.num_inputs} inputs, batch sizes "
            f"{', '.join(map(str, self.batch_sizes))}; max abs error {self.max_abs_error:.3g}, max error relative to "
            f"output scale {self.max_rel_error:.3g} (tolerance {self.rtol:.3g})"
        )
        if self.failure:
            text += f"\n  {self.failure}"
        for n in self.notes:
            text += f"\n  note: {n}"
        return text

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "max_abs_error": json_float(self.max_abs_error),
            "max_rel_error": json_float(self.max_rel_error),
            "rtol": self.rtol,
            "scale_floor": self.scale_floor,
            "num_inputs": self.num_inputs,
            "batch_sizes": list(self.batch_sizes),
            "precision": self.precision,
            "worst": self.worst,
            "failure": self.failure,
            "notes": list(self.notes),
        }


def json_float(x: float) -> float | str:
    """JSON has no inf/nan: those become strings."""
    return x if math.isfinite(x) else str(x)


@dataclass
class _Errors:
    max_abs: float = 0.0
    max_rel: float = 0.0
    rtol: float = 0.0
    worst: str = ""
    failure: str = ""

    def fail(self, where: str, message: str) -> None:
        if not self.failure:
            self.failure = f"{where}: {message}"
            self.worst = where
        self.max_abs = self.max_rel = math.inf


def compare_outputs(
    ref: Any, got: Any, *, rtol: float | None = None, label: str = "output", errors: _Errors | None = None
) -> _Errors:
    """Compare two output structures leaf by leaf under the tolerance policy."""
    errors = errors or _Errors()
    ref_leaves, ref_spec = pytree.tree_flatten(ref)
    got_leaves, got_spec = pytree.tree_flatten(got)
    if ref_spec != got_spec:
        errors.fail(label, f"output structure differs: original {ref_spec}, rewritten {got_spec}")
        return errors
    for i, (a, b) in enumerate(zip(ref_leaves, got_leaves)):
        where = f"{label}[{i}]" if len(ref_leaves) > 1 else label
        if not isinstance(a, torch.Tensor):
            if a != b:
                errors.fail(where, f"non-tensor output differs: {a!r} vs {b!r}")
            continue
        if not isinstance(b, torch.Tensor) or a.shape != b.shape or a.dtype != b.dtype:
            desc = f"{tuple(b.shape)} {b.dtype}" if isinstance(b, torch.Tensor) else type(b).__name__
            errors.fail(where, f"original gives {tuple(a.shape)} {a.dtype}, rewritten gives {desc}")
            continue
        tol = RTOL.get(a.dtype, 0.0) if rtol is None else rtol
        errors.rtol = max(errors.rtol, tol)
        a64, b64 = a.detach().double().cpu(), b.detach().double().cpu()
        same = (a64 == b64) | (torch.isnan(a64) & torch.isnan(b64))
        diff = torch.where(same, torch.zeros_like(a64), (a64 - b64).abs())
        max_abs = float(diff.max()) if diff.numel() else 0.0
        finite = a64[torch.isfinite(a64)]
        scale = max(float(finite.abs().max()) if finite.numel() else 0.0, SCALE_FLOOR)
        max_rel = max_abs / scale
        if max_rel > errors.max_rel or math.isnan(max_rel):
            errors.max_rel = max_rel
            if not errors.failure:  # until something fails, "worst" is the output with the largest error
                errors.worst = where
        if (math.isnan(max_abs) or max_abs > tol * scale) and not errors.failure:
            errors.failure = f"{where}: max abs error {max_abs:.3g} exceeds {tol:.3g} x output scale {scale:.3g}"
            errors.worst = where
        errors.max_abs = max(errors.max_abs, max_abs) if not math.isnan(max_abs) else math.inf
    return errors


def random_inputs(example: Sequence[torch.Tensor], generator: torch.Generator, batch: int | None = None) -> tuple:
    """Fresh inputs like ``example`` (same dtype, device, value range); dim 0 resized to ``batch`` when given."""
    n0 = example[0].shape[0] if example[0].dim() else None
    out = []
    for t in example:
        shape = list(t.shape)
        if batch is not None and t.dim() and shape[0] == n0:
            shape[0] = batch
        if t.is_floating_point():
            src = t.detach().double()
            std = float(src.std()) if src.numel() > 1 else 1.0
            std = std if math.isfinite(std) and std > 0 else 1.0
            mean = float(src.mean()) if src.numel() else 0.0
            mean = mean if math.isfinite(mean) else 0.0
            r = torch.randn(shape, generator=generator, dtype=torch.float64) * std + mean
        elif t.dtype == torch.bool:
            r = torch.randint(0, 2, shape, generator=generator).bool()
        elif t.is_complex():
            r = torch.randn(shape, generator=generator, dtype=t.dtype)
        else:
            lo = int(t.min()) if t.numel() else 0
            hi = int(t.max()) if t.numel() else 1
            r = torch.randint(lo, hi + 1, shape, generator=generator)
        r = r.to(dtype=t.dtype, device=t.device)
        if t.is_contiguous(memory_format=torch.channels_last) and t.dim() == 4 and not t.is_contiguous():
            r = r.contiguous(memory_format=torch.channels_last)
        out.append(r)
    return tuple(out)


def _run(model: nn.Module, inputs: Sequence[torch.Tensor]) -> Any:
    with torch.no_grad():
        return model(*[t.clone() for t in inputs])


def _to_float64(inputs: Sequence[torch.Tensor]) -> tuple:
    return tuple(t.double() if t.is_floating_point() else t for t in inputs)


def eval_copy(model: nn.Module, precision: Precision) -> nn.Module:
    """A copy of ``model`` in eval mode (parameters aliased, buffers cloned), converted to float64 for proofs."""
    m = working_copy(model).eval()
    if precision == "float64":
        m = m.to(torch.float64)
    return m


def _is_constant(outputs: Any) -> bool:
    """True when every floating-point tensor in ``outputs`` holds one value (and there is at least one)."""
    leaves = [t for t in pytree.tree_leaves(outputs) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    return bool(leaves) and all(t.numel() == 0 or bool((t == t.flatten()[0]).all()) for t in leaves)


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
    """
    orig = original_copy if original_copy is not None else eval_copy(original, precision)
    rew = eval_copy(rewritten, precision)
    return _validate_copies(orig, rew, example_inputs, num_random=num_random, precision=precision, rtol=rtol, seed=seed)


def _validate_copies(
    orig: nn.Module,
    rew: nn.Module,
    example_inputs: Sequence[torch.Tensor],
    *,
    num_random: int,
    precision: Precision,
    rtol: float | None,
    seed: int,
) -> Validation:
    cast: Callable[[Sequence[torch.Tensor]], tuple] = _to_float64 if precision == "float64" else tuple
    gen = torch.Generator().manual_seed(seed)
    batches: list[tuple] = [cast(example_inputs)]
    batches += [cast(random_inputs(example_inputs, gen)) for _ in range(num_random)]
    notes: list[str] = []
    batch_sizes = {int(example_inputs[0].shape[0])} if example_inputs[0].dim() else set()
    if example_inputs[0].dim():
        n = int(example_inputs[0].shape[0])
        other = cast(random_inputs(example_inputs, gen, batch=n + 1 if n > 1 else 2))
        try:
            _run(orig, other)
        except Exception as e:
            notes.append(f"batch axis is not free (the original rejects batch {other[0].shape[0]}: {e})"[:300])
        else:
            batches.append(other)
            batch_sizes.add(int(other[0].shape[0]))
    errors = _Errors()
    constant = True  # every floating output the same value on every input: the comparison cannot see the sites
    for k, inputs in enumerate(batches):
        label = "example input" if k == 0 else f"input #{k}"
        try:
            ref = _run(orig, inputs)
        except Exception as e:
            where = " in float64 (use precision='native')" if precision == "float64" else ""
            if k == 0:
                raise InputError(f"the original model fails on the example inputs{where}: {type(e).__name__}: {e}") from e
            notes.append(f"{label} skipped: the original model fails on it: {type(e).__name__}: {e}"[:300])
            continue
        try:
            got = _run(rew, inputs)
        except Exception as e:
            errors.fail(label, f"the rewritten model fails where the original runs: {type(e).__name__}: {e}")
            break
        compare_outputs(ref, got, rtol=rtol, label=f"{label} output", errors=errors)
        constant = constant and _is_constant(ref)
    if constant and not errors.failure:
        notes.append("the original's outputs do not depend on the input (constant on every validation input, e.g. "
                     "a zero-initialised head such as torchvision's ViT before training): this comparison cannot "
                     "see the rewritten sites; validate with trained or randomised weights")  # fmt: skip
        log.warning("validation: %s", notes[-1])
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
    )
