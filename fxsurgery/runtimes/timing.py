"""Side-by-side timing: the one measuring method used by ``to="auto"`` and the benchmark harness.

Original (A) and candidate (B) alternate (A B, B A, A B, ...) after a warm-up of each; each pair gives a ratio B/A;
the median ratio and its spread are kept, so drift of a shared, noisy machine cancels. onnxruntime sessions are
created with thread spinning off and pinned intra-op threads, so an idle session cannot steal the busy one's cores.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fxsurgery.capture.copies import eval_copy
from fxsurgery.errors import SurgeryError, one_line
from fxsurgery.runtimes.registry import get

__all__ = ["Ratio", "interleaved", "runner"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Ratio:
    """B/A over interleaved pairs: median and spread, with A's and B's median times in milliseconds."""

    median: float
    low: float
    high: float
    a_ms: float
    b_ms: float
    pairs: int

    def text(self) -> str:
        return f"{self.median:.2f} ({self.low:.2f}..{self.high:.2f})"


def interleaved(
    a: Callable[[], Any],
    b: Callable[[], Any],
    pairs: int,
    warmup: int = 2,
    min_sample_s: float = 0.02,
    settle: float | None = None,
) -> Ratio:
    """Time ``a`` and ``b`` alternately and return the ratio b/a per pair, summarised.

    A call shorter than ``min_sample_s`` is repeated within each sample (the same count on both sides), so that a
    millisecond-long call is not lost in timer and scheduler noise; times are per call.

    With ``settle``, the caller only asks on which side of ``settle`` the median ratio lies: timing stops once more
    than half of the ``pairs`` ratios lie on one side, as the median of all ``pairs`` would lie there too (the
    answer is the same as with every pair timed; the median and spread are those of the pairs timed).
    """
    for _ in range(warmup):
        a()
        b()
    start = time.perf_counter()
    a()
    b()
    once = max((time.perf_counter() - start) / 2, 1e-6)
    reps = max(1, min(1000, math.ceil(min_sample_s / once)))
    ratios, ta, tb = [], [], []
    for i in range(max(pairs, 1)):
        times = {}
        for f in (a, b) if i % 2 == 0 else (b, a):
            start = time.perf_counter()
            for _ in range(reps):
                f()
            times[f] = (time.perf_counter() - start) / reps
        ta.append(times[a])
        tb.append(times[b])
        ratios.append(times[b] / times[a])
        if settle is not None and _settled(ratios, settle, pairs):
            break
    return Ratio(
        statistics.median(ratios),
        min(ratios),
        max(ratios),
        statistics.median(ta) * 1e3,
        statistics.median(tb) * 1e3,
        len(ratios),
    )


def _settled(ratios: list[float], threshold: float, pairs: int) -> bool:
    majority = max(pairs, 1) // 2 + 1
    return sum(r < threshold for r in ratios) >= majority or sum(r >= threshold for r in ratios) >= majority


def runner(
    module: nn.Module,
    x: torch.Tensor | tuple[torch.Tensor, ...],
    runtime: str,
    workdir: Path,
    threads: int,
    exporter: str = "dynamo",
) -> Callable[[], Any]:
    """A zero-argument callable that runs ``module`` on ``x`` (a tensor or a tuple of them) once on ``runtime``, as
    that runtime's backend converts it (``timer``: :mod:`fxsurgery.runtimes.registry`; onnxruntime from an export
    with ``exporter`` into ``workdir``; ``threads`` threads). It runs an eval-mode copy with parameters, buffers and
    inputs of its own: ``module`` and ``x`` are left as they are."""
    backend = get(runtime, "time", "timing").impl()
    module = eval_copy(module, "native")  # its own parameters and buffers: a forward that writes stays local
    inputs = tuple(t.clone() for t in (x if isinstance(x, tuple) else (x,)))  # the caller's tensors never change
    try:
        return backend.timer(module, inputs, workdir, threads, exporter)
    except SurgeryError:
        raise
    except Exception as e:  # the runtime's conversion (an ONNX export, a toolchain's lowering) refused the model
        raise SurgeryError(
            f"{runtime} cannot run {type(module).__name__}, so it cannot be timed there: converting it failed "
            f"({one_line(e)}); time it on another runtime (runtime='torch')"
        ) from e
