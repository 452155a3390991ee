"""What a module's ``forward`` reads of the global or module mode, found in its source: tracing runs the code once,
so a branch on ``self.training`` is frozen to the traced mode, and a ``with torch.no_grad():`` (or ``autocast``)
region is not recorded at all.

* Grad-mode and autocast regions (``no_grad``, ``enable_grad``, ``set_grad_enabled``, ``inference_mode``,
  ``autocast``, ``is_grad_enabled``, ``is_autocast_enabled``): the module's own code must be kept (it stays a
  called module, and is rewritten inside).
* ``self.training``: the traced graph holds the branch of the traced mode; the rewritten graph checks that it runs
  in that mode (:func:`~fxsurgery._runtime.check_mode`) and raises otherwise.
"""

from __future__ import annotations

import ast
import functools
import inspect
import textwrap
from typing import Any

__all__ = ["mode_reads", "GRAD_MODE", "TRAINING"]

GRAD_MODE = frozenset(
    {
        "no_grad",
        "enable_grad",
        "set_grad_enabled",
        "inference_mode",
        "autocast",
        "is_grad_enabled",
        "is_autocast_enabled",
    }
)
TRAINING = "self.training"


def mode_reads(cls: type) -> frozenset[str]:
    """The mode-dependent names ``cls.forward`` reads (``self.training``, ``no_grad``, ...); empty when its source
    cannot be read (a builtin, or code made at run time). Cached per class."""
    return _mode_reads(cls)


@functools.cache
def _mode_reads(cls: Any) -> frozenset[str]:
    """The mode-dependent names ``cls.forward`` reads (``self.training``, ``no_grad``, ...); empty when its source
    cannot be read (a builtin, or code made at run time)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls.forward)))
    except (OSError, TypeError, SyntaxError, IndentationError):
        return frozenset()
    function = next((n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))), None)
    if function is None or not function.args.args:
        return frozenset()
    me = function.args.args[0].arg  # "self", by convention only
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr == "training" and _is_name(node.value, me):
            found.add(TRAINING)
        elif isinstance(node, ast.Attribute) and node.attr in GRAD_MODE:
            found.add(node.attr)
        elif isinstance(node, ast.Name) and node.id in GRAD_MODE:
            found.add(node.id)
    return frozenset(found)


def _is_name(node: ast.expr, name: str) -> bool:
    return isinstance(node, ast.Name) and node.id == name
