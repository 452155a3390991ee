"""Side-by-side timing: the one measuring method used by ``to="auto"`` and the benchmark harness.

Original (A) and candidate (B) alternate (A B, B A, A B, ...) after a warm-up of each; each pair gives a ratio B/A;
the median ratio and its spread are kept, so drift of a shared, noisy machine cancels. onnxruntime sessions are
created with thread spinning off and pinned intra-op threads, so an idle session cannot steal the busy one's cores.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fxsurgery.tracing.copies import eval_copy
from fxsurgery.verify.onnx_export import export_onnx
from fxsurgery.verify.ort import session

__all__ = ["Ratio", "interleaved", "ort_session", "runner"]


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


def interleaved(a: Callable[[], Any], b: Callable[[], Any], pairs: int, warmup: int = 2,
                min_sample_s: float = 0.02) -> Ratio:
    """Time ``a`` and ``b`` alternately and return the ratio b/a per pair, summarised.

    A call shorter than ``min_sample_s`` is repeated within each sample (the same count on both sides), so that a
    millisecond-long call is not lost in timer and scheduler noise; times are per call.
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
    return Ratio(statistics.median(ratios), min(ratios), max(ratios), statistics.median(ta) * 1e3,
                 statistics.median(tb) * 1e3, len(ratios))  # fmt: skip


def ort_session(path: str | Path, threads: int, providers: tuple[str, ...] = ("CPUExecutionProvider",)) -> Any:
    """An onnxruntime session for timing: ``threads`` intra-op threads, no thread spinning."""
    return session(path, threads=threads, providers=providers)


def runner(module: nn.Module, x: torch.Tensor, runtime: str, workdir: Path, threads: int) -> Callable[[], Any]:
    """A zero-argument callable that runs ``module`` on ``x`` once on ``runtime`` (``"torch"``: eager, no grad;
    ``"onnxruntime"``: exported into ``workdir`` and run in an :func:`ort_session`). It runs an eval-mode copy with
    parameters, buffers and input of its own: ``module`` and ``x`` are left as they are."""
    module = eval_copy(module, "native")  # its own parameters and buffers: a forward that writes stays local
    x = x.clone()  # and its own input: the caller's tensor never changes
    if runtime == "torch":
        def run_torch() -> Any:
            with torch.no_grad():
                return module(x)

        return run_torch
    path = workdir / f"m{len(list(workdir.iterdir()))}.onnx"
    export_onnx(module, (x,), path, dynamic_batch=False)
    session = ort_session(path, threads)
    feed = {session.get_inputs()[0].name: x.numpy()}
    return lambda: session.run(None, feed)
