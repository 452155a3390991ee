"""The comparison policy, one for validation and for the ONNX cross-check.

For each output tensor, with ``ref`` the original's output:

    max|got - ref|  <=  rtol[dtype of ref] * max(max|ref finite|, SCALE_FLOOR)

errors are measured relative to the magnitude of the output, not element by element (a Linear and a 7x7 conv sum
the same 25088 products in a different order; their float32 results differ by ~3e-5 at |y| ~ 45, far above
torch.testing's per-element defaults yet a ~1e-6 fraction of the output scale). NaN and infinities must stand in
the same places with the same values: a NaN or inf where the reference has none (or the reverse) fails. Integer and
boolean outputs must be equal. Complex outputs are compared by the modulus of the difference.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils._pytree as pytree

from fxsurgery.report import HISTOGRAM_BINS

__all__ = [
    "RTOL",
    "QUANTIZED_RTOL",
    "SCALE_FLOOR",
    "STRUCTURE",
    "Errors",
    "tolerance",
    "compare_tensor",
    "compare_outputs",
    "compare_leaves",
    "full_float32",
    "float32_products",
    "floating_leaves",
    "half_tolerance",
    "tf32_note",
    "HALF_CAP",
    "HALF_FACTOR",
]

#: Relative tolerance per output dtype, against the output's largest magnitude.
RTOL: dict[torch.dtype, float] = {
    torch.float64: 1e-10,
    torch.float32: 1e-4,
    torch.float16: 5e-3,
    torch.bfloat16: 3e-2,
    torch.complex128: 1e-10,
    torch.complex64: 1e-4,
}
#: Relative tolerance for a quantized graph's float outputs: the float sums of a Linear and of its conv differ in
#: their last bits, which can round a requantization the other way (one step of that quantize), and later layers
#: carry that step on; a wrong rewrite errs by the output's whole magnitude.
QUANTIZED_RTOL = 2e-2
#: The start of a failure that is about the outputs' structure or types, not their values.
STRUCTURE = "output structure differs"
#: Outputs smaller than this in magnitude are compared as if they were this large.
SCALE_FLOOR = 1e-3
#: A half-precision comparison that fails at its dtype's tolerance widens to this many times the original's own error
#: against its float32 run (:func:`half_tolerance`), while that stays below ``HALF_CAP`` of the output scale (beyond
#: it the half-precision original says too little).
HALF_FACTOR = 3
HALF_CAP = 0.1


def floating_leaves(outputs: Any) -> list[torch.Tensor]:
    """The floating-point tensors of an output structure, in order."""
    return [t for t in pytree.tree_leaves(outputs) if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _fp32_backends() -> tuple[Any, ...]:
    """torch's per-backend settings of how float32 products run ("ieee", "tf32", "bf16" or "none": inherit)."""
    b: Any = torch.backends
    return (b.cuda.matmul, b.cudnn.conv, b.cudnn.rnn, b.mkldnn.matmul, b.mkldnn.conv, b.mkldnn.rnn)


@contextmanager
def float32_products(precision: str, backends: Sequence[Any] | None = None) -> Iterator[None]:
    """Float32 matrix products and convolutions of ``backends`` (torch's ``fp32_precision`` settings; default: those
    of cuBLAS, cuDNN and oneDNN) at ``precision`` ("ieee", "tf32") while the block runs, the process's settings put
    back after, also on an exception."""
    backends = _fp32_backends() if backends is None else tuple(backends)
    saved = [backend.fp32_precision for backend in backends]
    try:
        for backend in backends:
            backend.fp32_precision = precision
        yield
    finally:
        for backend, value in zip(backends, saved):
            backend.fp32_precision = value


def full_float32() -> AbstractContextManager[None]:
    """Float32 matrix products and convolutions in full float32 (no TF32 in cuBLAS or cuDNN, no bf16 in oneDNN)
    while both sides of a comparison run: CUDA runs float32 convolutions in TF32 by default and matrix products not,
    so a Linear and its conv would differ by TF32's rounding (~1e-3 of the scale), which says nothing about the
    rewrite."""
    return float32_products("ieee")


def tf32_note(tensors: Sequence[torch.Tensor]) -> str | None:
    """What validation's full float32 hides where float32 ``tensors`` live on CUDA and this process lets cuBLAS or
    cuDNN round to TF32 (None otherwise)."""
    if not any(isinstance(t, torch.Tensor) and t.is_cuda and t.dtype == torch.float32 for t in tensors):
        return None
    b: Any = torch.backends
    pairs = (("cuDNN convolutions", b.cudnn.conv), ("cuBLAS matrix products", b.cuda.matmul))
    # (set_float32_matmul_precision and the legacy allow_tf32 flags write these settings too, and a global
    # torch.backends.fp32_precision reads through them; torch.get_float32_matmul_precision raises after a mix)
    tf32 = [name for name, backend in pairs if backend.fp32_precision == "tf32"]
    if not tf32:
        return None
    return (
        f"compared in full float32 (TF32 off while validation ran): this process lets {' and '.join(tf32)} round "
        "to TF32 (cuDNN's is torch's default), so run as they are here a Linear and its convolution differ by TF32's "
        "rounding (~1e-3 of the output scale), not by the rewrite; torch.backends.cudnn.conv.fp32_precision = "
        "'ieee' (and torch.backends.cuda.matmul.fp32_precision = 'ieee') runs them as validated"
    )


def tolerance(dtype: torch.dtype, rtol: float | None = None) -> float:
    """The tolerance for an output of ``dtype`` (0 for integers and booleans: they must be equal)."""
    return rtol if rtol is not None else RTOL.get(dtype, 0.0)


@dataclass
class Errors:
    """The running result of a comparison: the largest errors, and the first failure."""

    max_abs: float = 0.0
    max_rel: float = 0.0
    rtol: float = 0.0
    worst: str = ""
    failure: str = ""
    # per output (its name without the input's label), element counts per bin of HISTOGRAM_BINS; None: not counted
    # (only validation reports them)
    histograms: dict[str, list[int]] | None = None
    prefix: str = ""  # the input's label, left out of the histograms' output names

    def fail(self, where: str, message: str) -> None:
        if not self.failure:
            self.failure = f"{where}: {message}"
            self.worst = where
        self.max_abs = self.max_rel = math.inf


def _wide(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().cpu()
    return t.to(torch.complex128) if t.is_complex() else t.double()


def compare_tensor(
    a: torch.Tensor, b: torch.Tensor, where: str, errors: Errors, *, rtol: float | None = None, check_dtype: bool = True
) -> None:
    """Compare ``b`` against the reference ``a`` into ``errors``."""
    if a.shape != b.shape or (check_dtype and a.dtype != b.dtype):
        errors.fail(where, f"original gives {tuple(a.shape)} {a.dtype}, rewritten gives {tuple(b.shape)} {b.dtype}")
        return
    tol = tolerance(a.dtype, rtol)
    errors.rtol = max(errors.rtol, tol)
    a64, b64 = _wide(a), _wide(b)
    same = (a64 == b64) | (torch.isnan(a64) & torch.isnan(b64))
    diff = torch.where(same, torch.zeros_like(a64.real), (a64 - b64).abs().to(a64.real.dtype))
    max_abs = float(diff.max()) if diff.numel() else 0.0
    finite = a64[torch.isfinite(a64)].abs()
    scale = max(float(finite.max()) if finite.numel() else 0.0, SCALE_FLOOR)
    max_rel = max_abs / scale
    _count(errors, where, diff[torch.isfinite(diff)] / scale)
    if max_rel > errors.max_rel or math.isnan(max_rel):
        errors.max_rel = max_rel
        if not errors.failure:  # until something fails, "worst" is the output with the largest error
            errors.worst = where
    if (math.isnan(max_abs) or max_abs > tol * scale) and not errors.failure:
        what = f"max abs error {max_abs:.3g}" if math.isfinite(max_abs) else "NaN or inf where the other has a number"
        errors.failure = f"{where}: {what} exceeds {tol:.3g} x output scale {scale:.3g}"
        errors.worst = where
    errors.max_abs = max(errors.max_abs, max_abs) if not math.isnan(max_abs) else math.inf


def _count(errors: Errors, where: str, rel: torch.Tensor) -> None:
    """Add the elements' relative errors ``rel`` to the histogram of output ``where`` (where they are counted)."""
    if errors.histograms is None:
        return
    name = where.removeprefix(errors.prefix).strip() or "output"
    counts = errors.histograms.setdefault(name, [0] * len(HISTOGRAM_BINS))
    zero = rel == 0
    decade = torch.floor(torch.log10(rel[~zero].clamp_min(1e-300))).clamp(-17, 0).long() + 18  # -17 -> 1 ... 0 -> 18
    counts[0] += int(zero.sum())
    for b, n in zip(*torch.unique(decade, return_counts=True)):
        counts[min(int(b), len(HISTOGRAM_BINS) - 1)] += int(n)


#: How deep objects are compared attribute by attribute (a cache holds layers that hold tensors).
_OBJECT_DEPTH = 4


def _plain_object(x: Any) -> bool:
    """An object with attributes and no equality of its own (``==`` would compare identities)."""
    return hasattr(x, "__dict__") and type(x).__eq__ is object.__eq__ and not isinstance(x, (torch.Tensor, type))


def compare_outputs(
    ref: Any, got: Any, *, rtol: float | None = None, label: str = "output", errors: Errors | None = None
) -> Errors:
    """Compare two output structures leaf by leaf; the structures (dicts, tuples, dataclasses) must be equal."""
    errors = errors or Errors()
    ref_leaves, ref_spec = pytree.tree_flatten(ref)
    got_leaves, got_spec = pytree.tree_flatten(got)
    if ref_spec != got_spec:
        errors.fail(label, f"{STRUCTURE}: original {ref_spec}, rewritten {got_spec}")
        return errors
    for i, (a, b) in enumerate(zip(ref_leaves, got_leaves)):
        where = f"{label}[{i}]" if len(ref_leaves) > 1 else label
        if isinstance(a, Mapping):  # a dict subclass pytree does not know: same type, then field by field
            if type(a) is not type(b):
                errors.fail(where, f"{STRUCTURE}: original {type(a).__name__}, rewritten {type(b).__name__}")
            else:
                compare_outputs(dict(a), dict(b), rtol=rtol, label=where, errors=errors)
        elif _plain_object(a) and type(a) is type(b) and label.count(".") < _OBJECT_DEPTH:
            # an object compared by identity (a HuggingFace cache of keys and values): attribute by attribute
            compare_outputs(vars(a), vars(b), rtol=rtol, label=f"{where}.{type(a).__name__}", errors=errors)
        elif not isinstance(a, torch.Tensor):
            if a != b:
                errors.fail(where, f"non-tensor output differs: {a!r} vs {b!r}")
        elif not isinstance(b, torch.Tensor):
            errors.fail(where, f"original gives {tuple(a.shape)} {a.dtype}, rewritten gives {type(b).__name__}")
        else:
            compare_tensor(a, b, where, errors, rtol=rtol)
    return errors


def compare_leaves(
    ref: Sequence[torch.Tensor], got: Sequence[Any], *, rtol: float | None = None, label: str = "output"
) -> Errors:
    """Compare flat lists of outputs (an onnxruntime session's, as arrays or tensors) under the same policy;
    dtypes may differ (a runtime may widen), shapes and values may not."""
    errors = Errors()
    if len(ref) != len(got):
        errors.fail(label, f"{len(ref)} outputs against {len(got)}")
        return errors
    for i, (a, b) in enumerate(zip(ref, got)):
        b = b if isinstance(b, torch.Tensor) else torch.as_tensor(b)
        compare_tensor(a, b, f"{label}[{i}]" if len(ref) > 1 else label, errors, rtol=rtol, check_dtype=False)
    return errors


HALF = (torch.float16, torch.bfloat16)


def half_tolerance(ref: Any, got: Any, dtype: torch.dtype, float32_run: Any) -> tuple[float | None, str]:
    """The tolerance for a model that computes in ``dtype`` (float16 or bfloat16) and its note: None (each output's
    dtype's own) where ``got`` passes at the dtype's tolerance; else three times the original's own error against
    its float32 run (``float32_run()``: its outputs), where that stays below ``HALF_CAP``.

    Rounding to a half type at each layer compounds with depth (24 bfloat16 Linear + LayerNorm layers: ~3e-2 of the
    scale between the original and its float32 run, the type's tolerance), and a Linear and its conv round alike but
    not identically: a rewrite at most twice as far from the float32 run as the original is within three times the
    original's own error of it. A wrong rewrite errs by the output's magnitude."""
    if not compare_outputs(ref, got).failure:
        return None, ""
    own = compare_leaves(floating_leaves(float32_run()), floating_leaves(ref)).max_rel
    tol = max(tolerance(dtype), HALF_FACTOR * own)
    if not tol < HALF_CAP:  # (also NaN): the original in half precision says too little for a comparison in it
        return None, ""
    return tol, (
        f"a {str(dtype).removeprefix('torch.')} model: outputs compared to {tol:.2g} x output scale (three times "
        f"the original's own error against its float32 run, {own:.2g}), the type's {tolerance(dtype):g} being below "
        "what its rounding compounds to; precision='float64' proves the rewrite exact"
    )
