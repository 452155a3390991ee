"""Which front end a pass rewrites through: the one asked, or with ``frontend="auto"``, torch.fx, and where fx does
not trace the whole model, torch.export too, keeping whichever rewrites more sites, then whichever sees more
candidates, then fx. The first note of the result says which ran and why."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from fxsurgery.errors import SurgeryError, TraceError, cause_of
from fxsurgery.report import Site

__all__ = ["choose_front_end", "Rewritten"]

#: What rewriting through one front end gives: the new module, its sites, notes.
Rewritten = tuple[nn.Module, list[Site], list[str]]


def choose_front_end(frontend: str, rewrite_with: Callable[[str], Rewritten]) -> tuple[str, Rewritten]:
    """The front end that ran (``"fx"`` or ``"export"``) and what ``rewrite_with(front_end)`` gave through it, its
    notes led by the choice: see the module docstring."""
    if frontend != "auto":
        return _said(frontend, rewrite_with(frontend), f"front end: {frontend} (as asked)")
    fx_out: Rewritten | None = None
    try:
        fx_out = rewrite_with("fx")
    except TraceError as e:
        fx_error = e
    if fx_out is not None and not any(p in n for p in _PARTIAL for n in fx_out[2]):
        return _said("fx", fx_out, "front end: fx (torch.fx traced the whole model)")
    try:
        ex_out = rewrite_with("export")
    except SurgeryError as e:
        if fx_out is None:
            raise fx_error from e
        return _said(
            "fx",
            fx_out,
            f"front end: fx (torch.fx did not trace the whole model; torch.export failed too: {cause_of(e)})",
        )
    if fx_out is None:
        return _said("export", ex_out, f"front end: export (torch.fx cannot trace the model: {cause_of(fx_error)})")
    # more sites rewritten wins; then more candidates seen (listed with their reasons); then fx
    n_ex, n_fx = (sum(s.rewritten for s in out[1]) for out in (ex_out, fx_out))
    if (n_ex, len(ex_out[1])) > (n_fx, len(fx_out[1])):
        return _said(
            "export",
            ex_out,
            f"front end: export (torch.fx did not trace the whole model; torch.export "
            f"rewrites {n_ex} of {len(ex_out[1])} candidates, fx {n_fx} of "
            f"{len(fx_out[1])})",
        )
    return _said(
        "fx",
        fx_out,
        f"front end: fx (torch.fx did not trace the whole model, but torch.export does no "
        f"better: {n_ex} of {len(ex_out[1])} candidates rewritten, fx {n_fx} of "
        f"{len(fx_out[1])})",
    )


def _said(frontend: str, out: Rewritten, note: str) -> tuple[str, Rewritten]:
    return frontend, (out[0], out[1], [note, *out[2]])


#: The notes of a partial fx trace (a submodule or the root left as code).
_PARTIAL = ("cannot be traced", "left untouched")
