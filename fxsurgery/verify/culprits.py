"""The culprit search of a failed validation: which rewritten sites fail it on their own."""

from __future__ import annotations

from collections.abc import Callable

from fxsurgery.report import Site

__all__ = ["find_culprits"]


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
