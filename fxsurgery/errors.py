"""The package's exceptions: one base class, :class:`SurgeryError`, and its specialisations."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fxsurgery.report import SurgeryResult

__all__ = [
    "reported_as_internal",
    "SurgeryError",
    "TraceError",
    "ValidationError",
    "InputError",
    "one_line",
    "full_text",
    "cause_of",
    "quiet_loggers",
]


class SurgeryError(Exception):
    """Base class of every error fxsurgery raises for a bad model or bad input."""


class InputError(SurgeryError):
    """The arguments are malformed: wrong example inputs, unknown options, unusable model object."""


class TraceError(SurgeryError):
    """torch.fx could not trace the model (or shape propagation failed).

    ``module`` names the submodule that failed (qualified name, ``""`` for the root) when it is known; ``cause`` is the
    message without the advice, for reports that quote it.
    """

    def __init__(self, message: str, *, module: str | None = None, cause: str | None = None) -> None:
        super().__init__(message)
        self.module = module
        self.cause = cause or message


class ValidationError(SurgeryError):
    """The rewritten model's outputs differ from the original's beyond tolerance.

    ``result`` carries the :class:`~fxsurgery.SurgeryResult` (with its ``validation``) so the caller can inspect it;
    ``sites`` names the sites found responsible.
    """

    def __init__(self, message: str, *, result: SurgeryResult | Any, sites: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.result = result
        self.sites = sites


def one_line(e: BaseException, limit: int = 300) -> str:
    """``Type: first line of the message``, for one-line error reports."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")[:limit]


def full_text(e: BaseException, limit: int = 4000) -> str:
    """``Type: the whole message`` with blank lines dropped, cut at ``limit`` characters: for a toolchain's error,
    whose cause is rarely on its first line (OpenVINO names the op it could not convert on the sixth)."""
    lines = [line.rstrip() for line in str(e).strip().splitlines() if line.strip()]
    text = f"{type(e).__name__}: " + "\n".join(lines) if lines else type(e).__name__
    return text if len(text) <= limit else text[:limit] + f"... [{len(text) - limit} more characters]"


def cause_of(e: BaseException) -> str:
    """What went wrong, for a note: a TraceError's cause, else the error's text."""
    return e.cause if isinstance(e, TraceError) else str(e)


@contextmanager
def quiet_loggers(*prefixes: str) -> Iterator[None]:
    """The loggers named ``prefix`` or below it at ERROR while the block runs, and at their own levels again after:
    third-party progress and value dumps around a step whose outcome fxsurgery reports itself."""
    names = [
        n
        for n in [*prefixes, *logging.root.manager.loggerDict]
        if any(n == p or n.startswith(f"{p}.") for p in prefixes)
    ]
    loggers = [logging.getLogger(n) for n in dict.fromkeys(names)]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


@contextmanager
def reported_as_internal(doing: str = "rewriting", meanwhile: str = "") -> Iterator[None]:
    """A rewrite's own failure (not a SurgeryError it raised on purpose) as a SurgeryError asking for a report
    (``meanwhile``: what to do until it is mended)."""
    try:
        yield
    except SurgeryError:
        raise
    except Exception as e:
        hint = f", and {meanwhile} meanwhile" if meanwhile else ""
        raise SurgeryError(f"internal error while {doing} ({type(e).__name__}: {e}); please report it{hint}") from e
