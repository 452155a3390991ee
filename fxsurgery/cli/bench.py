"""``fxsurgery bench`` (:func:`fxsurgery.benchmark` from the shell: rewritten/original per runtime and batch, with
the noise floor; ``--json`` for machines, ``--chart FILE`` for the ratio chart), ``fxsurgery report DIR``
(``report.html`` rebuilt from ``report.json``), and the list-valued arguments of ``rewrite``."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fxsurgery.artifacts import ARTIFACTS
from fxsurgery.cli.inputs import UsageError
from fxsurgery.runtimes.registry import named

__all__ = ["add_bench", "run_bench", "add_report", "run_report", "artifacts_list", "runtimes_list"]


def _list_of(kind: Callable[[str], Any], name: str) -> Callable[[str], list[Any]]:
    def parse(text: str) -> list[Any]:
        try:
            return [kind(v.strip()) for v in text.split(",") if v.strip()]
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"{name} must be a comma-separated list: {e}") from e

    return parse


def artifacts_list(text: str) -> tuple[str, ...]:
    names = {n.strip() for n in text.split(",") if n.strip()}
    if names in ({"all"}, {"none"}):
        return ARTIFACTS if names == {"all"} else ()
    unknown = sorted(names - set(ARTIFACTS))
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown artifact {unknown[0] if unknown else text!r}: a comma-separated "
            f"list of {', '.join(ARTIFACTS)}, or all, or none"
        )
    return tuple(a for a in ARTIFACTS if a in names)


def _names(allowed: Sequence[str], what: str) -> Callable[[str], tuple[str, ...]]:
    """An argument type: a comma-separated list of some of ``allowed``."""

    def parse(text: str) -> tuple[str, ...]:
        names = tuple(n.strip() for n in text.split(",") if n.strip())
        unknown = [n for n in names if n not in allowed]
        if unknown or not names:
            raise argparse.ArgumentTypeError(
                f"unknown {what} {unknown[0] if unknown else text!r}: a comma-separated list of {', '.join(allowed)}"
            )
        return names

    return parse


#: ``rewrite --cross-check-runtimes``
runtimes_list = _names(named("run"), "runtime")


def add_bench(sub: Any, model_arguments: Callable[[argparse.ArgumentParser], None]) -> None:
    b = sub.add_parser("bench", help="time the rewritten model against the original, per runtime and batch size")
    model_arguments(b)
    b.add_argument("--to", choices=("conv", "linear", "auto"), required=True, help="target layer type")
    b.add_argument(
        "--runtime",
        dest="runtimes",
        type=_names(named("time"), "runtime"),
        default=("onnxruntime", "torch"),
        metavar="LIST",
        help=f"comma-separated, of {', '.join(named('time'))} (default onnxruntime,torch)",
    )
    b.add_argument(
        "--batch",
        type=_list_of(int, "--batch"),
        default=None,
        metavar="LIST",
        help="comma-separated batch sizes (default: the example input's)",
    )
    b.add_argument("--pairs", type=int, default=7, help="interleaved pairs per ratio (default 7)")
    b.add_argument("--threads", type=int, default=2, help="threads of torch and of each session (default 2)")
    b.add_argument("--no-validate", action="store_true", help="time without validating the rewrite first")
    b.add_argument("--chart", metavar="FILE", help="write the ratio chart (.png or .svg; needs matplotlib)")
    b.add_argument("--quiet", action="store_true", help="no progress messages on stderr")
    b.add_argument("--json", action="store_true", help="print the report as JSON")


def run_bench(args: argparse.Namespace, model: Any, inputs: tuple, progress: Any) -> int:
    from fxsurgery.cli.options import options_from
    from fxsurgery.runtimes.bench import benchmark, ratio_chart

    chart = Path(args.chart) if args.chart else None
    if chart is not None and (chart.suffix.lower() not in (".png", ".svg") or not chart.parent.is_dir()):
        raise UsageError(f"--chart {args.chart}: give a .png or .svg file in a folder that exists")  # before the work
    with progress.step(f"rewriting towards {args.to} and timing on {', '.join(args.runtimes)}"):
        report = benchmark(
            model,
            inputs,
            args.to,
            runtimes=args.runtimes,
            batches=args.batch,
            pairs=args.pairs,
            threads=args.threads,
            options=options_from(args, validate=not args.no_validate),
        )
    if args.chart:
        ratio_chart(
            [(f"{r.runtime} b{r.batch}", r.ratio, r.noise) for r in report.rows],
            args.chart,
            title=f"{report.model} {report.direction}: rewritten / original",
        )
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.summary())
    return 0


def add_report(sub: Any) -> None:
    r = sub.add_parser("report", help="rebuild DIR/report.html from DIR/report.json")
    r.add_argument("dir", metavar="DIR", help="a folder written by fxsurgery rewrite --out")


def run_report(args: argparse.Namespace) -> int:
    from fxsurgery.artifacts.report_html import MalformedReport, write_html

    source = Path(args.dir) / "report.json"
    if not source.is_file():
        raise UsageError(f"{source} not found: DIR must be a folder written by fxsurgery rewrite --out")
    try:
        data = json.loads(source.read_text())
    except ValueError as e:
        raise UsageError(f"{source} is not JSON: {e}") from e
    if not isinstance(data, dict) or "sites" not in data:
        raise UsageError(f"{source} is not a fxsurgery report (no sites)")
    try:
        print(write_html(data, Path(args.dir) / "report.html"))
    except MalformedReport as e:
        raise UsageError(f"{source}: {e}") from e
    return 0
