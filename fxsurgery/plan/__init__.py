"""Planning: which of the rules' matches a pass takes. :mod:`.targets` (``target=``: the layouts and the patterns a
deployment toolchain runs badly) and :mod:`.auto` (``to="auto"``: per site the faster form, measured on a runtime)."""

from __future__ import annotations

__all__: list[str] = []
