"""A failed validation explained: which rewritten sites fail it on their own (the culprit search), or why no site is
responsible."""

from __future__ import annotations

from collections.abc import Callable

from fxsurgery.errors import ValidationError
from fxsurgery.report import Site, SurgeryResult
from fxsurgery.verify.policy import STRUCTURE

__all__ = ["find_culprits", "failure_of"]


def find_culprits(rewritten: list[Site], error: float, error_of: Callable[[list[Site]], float | None]) -> list[Site]:
    """The sites whose rewrite alone fails validation, worst first, by halving: ``error_of(group)`` is the
    validation error with only ``group`` rewritten (None: it passes; the caller rewrites from the graphs it already
    captured); the halves of a failing group that fail are kept, down to single sites (about 2 log2(n) rewrites for
    one culprit among n, instead of n). ``error``: that of all of ``rewritten``. Empty when no single site fails
    alone (an interaction between sites)."""
    if len(rewritten) <= 1:
        return rewritten

    def search(group: list[Site], error: float) -> list[tuple[float, Site]]:
        if len(group) == 1:
            return [(error, group[0])]
        found = []
        for part in (group[: len(group) // 2], group[len(group) // 2 :]):
            part_error = error_of(part)
            if part_error is not None:
                found += search(part, part_error)
        return found

    scored = search(rewritten, error)
    scored.sort(key=lambda p: -p[0])
    return [s for _, s in scored]


def failure_of(result: SurgeryResult, frontend: str, error_of: Callable[[list[Site]], float | None]) -> ValidationError:
    """The error of ``result``'s failed validation, naming the sites that fail it on their own, or saying that no
    site is responsible: the graph returns another structure, or the graph ``frontend`` made fails with no site
    rewritten (``error_of([])``)."""
    check = result.validation
    assert check is not None
    if STRUCTURE in check.failure:  # not a site's doing: the graph as a whole returns something else
        return ValidationError(
            f"validation failed: {check.failure}; the rewritten graph returns another "
            "structure than the model (no site is responsible): please report the model",
            result=result,
        )
    if error_of([]) is not None:
        other = "fx" if frontend == "export" else "export"
        return ValidationError(
            f"validation failed: {check.failure}; the graph {frontend} made fails with no "
            f"site rewritten (no site is responsible): try frontend={other!r}, and please "
            "report the model",
            result=result,
        )
    culprits = find_culprits(result.rewritten, check.max_rel_error, error_of)
    named = ", ".join(f"{s.name} ({s.pattern})" for s in culprits) or "the combination of rewritten sites"
    return ValidationError(
        f"validation failed: {check.failure}; responsible: {named}. Exclude the site with "
        "exclude=[...] and report the model",
        result=result,
        sites=tuple(s.name for s in culprits),
    )
