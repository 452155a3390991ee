"""The one place where the command line's arguments become :class:`fxsurgery.Options`, for every subcommand."""

from __future__ import annotations

import argparse
from typing import Any

from fxsurgery.options import Options, resolve

__all__ = ["options_from"]


#: The arguments that are options of :class:`fxsurgery.Options`: argparse destination -> option.
_OPTIONS = {
    "frontend": "frontend",
    "leaf_module": "leaf_modules",
    "exclude": "exclude",
    "target": "target",
    "batch_layout": "batch_layout",
    "token_layout": "token_layout",
    "quantize": "quantize",
    "precision": "precision",
    "rtol": "rtol",
    "runtime": "runtime",
    "exporter": "exporter",
    "provider": "providers",
    "opset": "opset",
    "cross_check_runtimes": "runtimes",
}


def options_from(args: argparse.Namespace, **more: Any) -> Options:
    """The one place where the command line's arguments become :class:`fxsurgery.Options`, for every subcommand:
    the options its parser has and the user gave (the others keep their defaults), with ``more`` on top."""
    given = {option: getattr(args, dest) for dest, option in _OPTIONS.items() if getattr(args, dest, None) is not None}
    if getattr(args, "static_batch", False):
        given["dynamic_batch"] = False
    if getattr(args, "dynamic_sequence", False):  # (set for a HuggingFace MODEL whose inputs come from its config)
        given["dynamic_sequence"] = True
    return resolve(None, {**given, **more})
