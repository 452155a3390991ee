"""``fxsurgery.benchmark`` (CLI ``fxsurgery bench``): a user's model against its rewritten form, timed the way this
project's own figures are (``benchmarks/results.md`` comes from it).

Per runtime and batch size: the original (A) and the rewritten model (B) alternate after a warm-up, A B, B A, ...;
each pair gives B/A; the median and spread are reported, beside the noise floor (the original against a second
copy of itself, measured the same way: a ratio inside the noise floor is no difference). Sessions and torch run
with ``threads`` threads and no thread spinning (:mod:`fxsurgery.runtimes.timing`). onnxruntime times the dynamo export,
the file ``rewrite`` ships; OpenVINO its CPU plugin in float32.
"""

from __future__ import annotations

import contextlib
import os
import platform
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fxsurgery.api import _with_keywords, rewrite
from fxsurgery.capture import refuse_meta
from fxsurgery.errors import InputError
from fxsurgery.options import Options, resolve
from fxsurgery.report import format_table
from fxsurgery.runtimes.registry import named
from fxsurgery.runtimes.timing import Ratio, interleaved, runner
from fxsurgery.verify.validation import random_inputs

__all__ = ["benchmark", "BenchRow", "BenchReport", "ratio_chart"]


@dataclass(frozen=True)
class BenchRow:
    """One runtime at one batch size: rewritten/original, and the original against itself."""

    runtime: str
    batch: int
    ratio: Ratio
    noise: Ratio

    @property
    def verdict(self) -> str:
        """``faster`` or ``slower`` where the ratio's whole spread lies beyond the noise floor's spread (the original
        against itself) on that side; ``within noise`` otherwise."""
        if self.ratio.high < min(self.noise.low, 1.0):
            return "faster"
        if self.ratio.low > max(self.noise.high, 1.0):
            return "slower"
        return "within noise"


@dataclass(frozen=True)
class BenchReport:
    """What :func:`benchmark` measured; ``rows`` per runtime and batch."""

    model: str
    direction: str
    rewritten_sites: int
    pairs: int
    threads: int
    machine: str
    rows: tuple[BenchRow, ...]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for row, r in zip(d["rows"], self.rows):
            row["verdict"] = r.verdict
        return d

    def summary(self) -> str:
        table = [
            (
                r.runtime,
                r.batch,
                r.ratio.text(),
                r.noise.text(),
                r.verdict,
                f"{r.ratio.a_ms:.3g}",
                f"{r.ratio.b_ms:.3g}",
            )
            for r in self.rows
        ]
        head = (
            f"{self.model}, {self.direction} ({self.rewritten_sites} sites rewritten): rewritten/original, "
            f"median of {self.pairs} interleaved pairs (spread), {self.threads} threads; {self.machine}"
        )
        return (
            head
            + "\n"
            + format_table(
                ("runtime", "batch", "rewritten/original", "noise floor", "verdict", "original ms", "rewritten ms"),
                table,
            )
        )


def benchmark(
    model: nn.Module,
    example_inputs: Any,
    to: str = "conv",
    *,
    runtimes: Sequence[str] = ("onnxruntime", "torch"),
    batches: Sequence[int] | None = None,
    pairs: int = 7,
    threads: int = 2,
    options: Options | None = None,
    **overrides: Any,
) -> BenchReport:
    """Rewrite ``model`` towards ``to`` (as :func:`fxsurgery.rewrite`, validated unless ``validate=False``), then
    time the rewritten model against the original per runtime (``"onnxruntime"``, ``"torch"``, ``"openvino"``) and
    per batch size (default: the example's; other sizes get fresh inputs like the example's), ``pairs`` interleaved
    pairs each, with ``threads`` threads. The model and its inputs are left as they are."""
    unknown = sorted(set(runtimes) - set(named("time")))
    if unknown or not runtimes:
        raise InputError(f"runtimes must be some of {named('time')}, got {list(runtimes)!r}")
    if pairs < 1 or threads < 1 or any(b < 1 for b in batches or ()):
        raise InputError("pairs, threads and batch sizes must be at least 1")
    refuse_meta(model if isinstance(model, nn.Module) else None, example_inputs, "a benchmark")
    opts = resolve(options, overrides)
    result = rewrite(model, example_inputs, to, options=opts)
    base, inputs = _with_keywords(model, example_inputs)
    new, _ = _with_keywords(result.module, example_inputs)
    example_batch = inputs[0].shape[0] if inputs[0].dim() else 1
    rows = []
    with _threads(threads), tempfile.TemporaryDirectory(prefix="fxsurgery-bench-") as tmp:
        for batch in batches or (example_batch,):
            xs = (
                inputs if batch == example_batch else random_inputs(inputs, torch.Generator().manual_seed(batch), batch)
            )
            for rt in runtimes:
                original = runner(base, xs, rt, Path(tmp), threads)
                ratio = interleaved(original, runner(new, xs, rt, Path(tmp), threads), pairs)
                rows.append(
                    BenchRow(rt, batch, ratio, interleaved(original, runner(base, xs, rt, Path(tmp), threads), pairs))
                )
    machine = f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    return BenchReport(
        type(model).__name__, result.direction, len(result.rewritten), pairs, threads, machine, tuple(rows)
    )


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def ratio_chart(
    rows: Sequence[tuple[str, Ratio | dict[str, Any], Ratio | dict[str, Any]]],
    path: str | os.PathLike,
    title: str = "rewritten / original",
) -> None:
    """A PNG (or SVG, by ``path``'s suffix) of ``(label, ratio, noise)`` rows: per row the median ratio as a dot with
    its spread, over the noise floor's spread as a grey band; 1.0 marked; below 1 is faster. Needs matplotlib
    (``pip install "fxsurgery[bench]"``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise InputError('the ratio chart needs matplotlib: pip install "fxsurgery[bench]"') from e
    stats = [(label, _stats(r), _stats(n)) for label, r, n in rows]
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.32 * len(stats)))
    for y, (_, (med, low, high), (_, nlow, nhigh)) in enumerate(stats):
        ax.fill_betweenx([y - 0.35, y + 0.35], nlow, nhigh, color="0.85", linewidth=0)
        color = "tab:green" if high < nlow else "tab:red" if low > nhigh else "tab:gray"
        ax.errorbar(med, y, xerr=[[med - low], [high - med]], fmt="o", color=color, capsize=3)
        ax.annotate(f"{med:.2f}", (high, y), xytext=(4, 0), textcoords="offset points", va="center", fontsize=8)
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(stats)), [label for label, _, _ in stats], fontsize=8)
    ax.set_ylim(len(stats) - 0.5, -0.5)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("median, spread; grey: noise floor (original vs itself); < 1 is faster", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _stats(r: Ratio | dict[str, Any]) -> tuple[float, float, float]:
    d = asdict(r) if isinstance(r, Ratio) else r
    return d["median"], d["low"], d["high"]
