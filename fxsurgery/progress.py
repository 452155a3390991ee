"""Progress of the long steps (each export, each runtime, the localization) on the ``fxsurgery.progress`` logger at
INFO: silent unless a handler shows it (the command line does, unless ``--quiet``;
``logging.basicConfig(level=logging.INFO)`` does in a script)."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["step"]

log = logging.getLogger("fxsurgery.progress")


@contextmanager
def step(what: str) -> Iterator[None]:
    """``what ...`` when the block starts and ``what: 1.2s`` when it ends (not when it raises: the error says why)."""
    start = time.perf_counter()
    log.info("%s ...", what, extra={"step": what})
    yield
    seconds = time.perf_counter() - start
    log.info("%s: %.1fs", what, seconds, extra={"step": what, "seconds": seconds})
