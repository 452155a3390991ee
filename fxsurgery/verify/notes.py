"""What a validation's reference outputs say about the validation itself: outputs that do not depend on the input,
outputs too small for the comparison floor."""

from __future__ import annotations

from typing import Any

import torch

from fxsurgery.verify.policy import SCALE_FLOOR, floating_leaves

__all__ = ["input_independent", "independence_note", "floor_warning"]

_CONSTANT_NOTE = (
    "the original's outputs do not depend on the input ({which} the same on every validation input, "
    "e.g. a zero-initialised head such as torchvision's ViT before training, or a Linear with zero "
    "weights): this comparison cannot see the rewritten sites that feed {them}; validate with trained "
    "or randomised weights"
)


def input_independent(refs: list[Any]) -> list[int]:
    """Indices of the floating outputs that are the same whatever the input: equal on every validation input of the
    example's shape or, with one such input, equal for every sample of its batch."""
    leaves = [floating_leaves(r) for r in refs]
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


def independence_note(refs: list[Any]) -> str | None:
    fixed = input_independent(refs)
    if not fixed:
        return None
    n = len(floating_leaves(refs[0]))
    which = "every output is" if len(fixed) == n else f"output{'s' if len(fixed) > 1 else ''} {fixed} of {n}"
    return _CONSTANT_NOTE.format(which=which, them="them" if len(fixed) == n else "those outputs")


def floor_warning(refs: list[Any], rtol: float) -> str:
    """What the comparison floor hides when the original's float outputs are all below it ("" when they are not):
    errors are measured against ``SCALE_FLOOR``, so outputs far below it are compared loosely, or not at all."""
    finite = [t.detach()[torch.isfinite(t)] for r in refs for t in floating_leaves(r)]
    finite = [t for t in finite if t.numel()]
    if not finite:
        return ""
    scale = max(float(t.abs().max()) for t in finite)
    if scale >= SCALE_FLOOR:
        return ""
    if scale <= rtol * SCALE_FLOOR:
        what = "an output of zeros would pass: this validation tested nothing"
    else:
        what = f"the tolerance is {SCALE_FLOOR / scale:.3g}x looser than stated"
    return (
        f"the original's outputs are at most {scale:.3g} in magnitude, below the comparison floor {SCALE_FLOOR:g} "
        f"errors are measured against: {what}; validate with trained weights (--weights, load_state_dict) or inputs "
        "that give outputs of real size"
    )
