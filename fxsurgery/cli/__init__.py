"""The ``fxsurgery`` command line.

Exit codes: 0 everything passed, 1 validation or the ONNX cross-check found a mismatch, 2 bad usage or bad input.
Errors are one line on stderr, without a traceback. Output is written to a temporary folder beside ``--out`` and
renamed into place at the end, so a failed run leaves nothing that looks valid.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fxsurgery.artifacts._staging import file_mode, staged_folder
from fxsurgery.artifacts.checkpoint import ARTIFACTS
from fxsurgery.artifacts.report_html import write_html
from fxsurgery.cli.bench import run_bench, run_report
from fxsurgery.cli.inputs import (
    UsageError,
    check_input_dims,
    check_input_size,
    example_inputs,
    parse_input,
)
from fxsurgery.cli.model import build_model, load_program, load_weights
from fxsurgery.cli.options import options_from
from fxsurgery.cli.parser import build_parser

__all__ = ["main"]

EXIT_OK, EXIT_MISMATCH, EXIT_USAGE = 0, 1, 2


class _Progress:
    """Step messages on stderr with the time each step took; silent with --quiet."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet

    @contextmanager
    def step(self, what: str) -> Iterator[None]:
        start = time.perf_counter()
        if not self.quiet:
            print(f"fxsurgery: {what} ...", file=sys.stderr, flush=True)
        yield
        if not self.quiet:
            print(f"fxsurgery: {what}: done in {time.perf_counter() - start:.1f}s", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except UsageError as e:
        return _fail(str(e))
    if args.command is None:
        build_parser().print_help(sys.stderr)
        return EXIT_USAGE
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # "torchvision is not installed" notices on every export
    from fxsurgery.errors import InputError, SurgeryError, TraceError

    progress = _Progress(getattr(args, "quiet", False))
    try:
        if args.command == "demo":
            return _demo(args, progress)
        if args.command == "convert":
            return _convert(args)
        if args.command == "list":
            return _list(args, progress)
        if args.command == "report":
            return run_report(args)
        if args.command == "bench":
            model, positional, named = _model_and_inputs(args, progress)
            return run_bench(args, model, (*positional, named) if named else positional, progress)
        return _rewrite(args, progress)
    except (UsageError, InputError, TraceError) as e:
        return _fail(str(e))
    except SurgeryError as e:
        return _fail(str(e), EXIT_MISMATCH)
    except SystemExit as e:  # the model's own code called sys.exit: that is no result
        return _fail(f"the model's code exited (SystemExit: {e.code}) before the rewrite finished")
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    except Exception as e:  # not foreseen: still one line, never a traceback, unless asked for one
        if os.environ.get("FXSURGERY_TRACEBACK"):
            raise
        from fxsurgery.errors import one_line

        return _fail(
            f"{one_line(e)} (an error fxsurgery did not foresee; FXSURGERY_TRACEBACK=1 prints where it "
            "happened: please report it)"
        )


def _convert(args: argparse.Namespace) -> int:
    from fxsurgery.artifacts.convert import convert_checkpoint

    summary = convert_checkpoint(args.layouts, args.src, args.dst, to=args.to)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(
            f"wrote {args.dst}: {summary['tensors']} tensors in {len(summary['files'])} file(s), "
            f"{summary['converted']} in the {args.to} format ({summary['moved_bytes']} bytes moved, the rest "
            "copied as they are)"
        )
    return 0


def _fail(message: str, code: int = EXIT_USAGE) -> int:
    print(f"fxsurgery: error: {message}", file=sys.stderr)
    return code


# -- rewrite -------------------------------------------------------------------------------------------------------


def _model_and_inputs(args: argparse.Namespace, progress: _Progress) -> tuple[Any, tuple, dict[str, Any]]:
    """The user's model (built, weights loaded, in ``--dtype``, eval mode) and its positional and keyword inputs."""
    import torch

    specs = [parse_input(s, "--input-shape", args.dtype) for s in args.input_shape]
    specs += [parse_input(s, "--input", args.dtype) for s in args.input]
    if args.model.endswith(".pt2"):
        program, positional, named = load_program(
            args.model,
            bool(specs),
            {
                "--weights": bool(args.weights),
                "--model-kwargs": args.model_kwargs != "{}",
                "--dtype": args.dtype != "float32",
            },
            args.unsafe_pickle,
        )
        return (program, *_split(specs)) if specs else (program, positional, named)
    if not specs:
        raise UsageError("no example input: give --input-shape N,C,H,W (and/or --input NAME=SHAPE[:DTYPE])")
    dtype = getattr(torch, args.dtype)
    check_input_size([shape for _, shape, _ in specs], dtype)
    with progress.step(f"building {args.model}"):
        model = build_model(args.model, args.model_kwargs)
        if args.weights:
            load_weights(model, args.weights, args.unsafe_pickle)
        model = model.to(dtype).eval()
    positional, named = _split(specs)
    check_input_dims(model, positional)
    return model, positional, named


def _split(specs: list[tuple[str | None, tuple[int, ...], str]]) -> tuple[tuple, dict[str, Any]]:
    """Example inputs made from ``specs``: the positional ones, and the keyword ones by name."""
    inputs = example_inputs(specs)
    return (
        tuple(t for (name, _, _), t in zip(specs, inputs) if name is None),
        {name: t for (name, _, _), t in zip(specs, inputs) if name is not None},
    )


def _rewrite(args: argparse.Namespace, progress: _Progress) -> int:
    from fxsurgery.report import moved

    if args.dry_run:
        if args.to == "auto":
            return _fail("--dry-run lists the sites of one direction: use --to conv or --to linear")
        return _list(args, progress)
    if not args.out:
        return _fail("--out is required (an output directory that does not exist, or is empty), or --dry-run")
    with staged_folder(args.out, "output directory", "choose another --out") as tmp:
        model, positional, named = _model_and_inputs(args, progress)
        report = _run_pipeline(model, (*positional, named) if named else positional, args.to, tmp, args, progress)
        if "onnx" in args.artifacts:
            report = moved(report, args.out)  # the staging folder becomes --out below
        else:
            for f in tmp.glob("*.onnx*"):
                f.unlink()
            report = moved(report, None, "(not kept: --artifacts without onnx)")
        names = [f"input_{i}" for i in range(len(positional))] + list(named)
        data = _write_report(report, tmp, list(zip(names, (*positional, *named.values()))), progress, args.artifacts)
    print(json.dumps(data, indent=2) if args.json else report.summary())
    return EXIT_OK if report.passed else EXIT_MISMATCH


def _list(args: argparse.Namespace, progress: _Progress) -> int:
    from fxsurgery.api import rewrite

    model, positional, named = _model_and_inputs(args, progress)
    with progress.step(f"tracing and matching the rules towards {args.to} (no validation, no export)"):
        res = rewrite(
            model, (*positional, named) if named else positional, args.to, options=options_from(args, validate=False)
        )
    data = res.to_dict()
    print(
        json.dumps({k: data[k] for k in ("direction", "frontend", "sites", "notes")}, indent=2)
        if args.json
        else res.summary()
    )
    return EXIT_OK


def _run_pipeline(
    model: Any, inputs: tuple, to: str, out_dir: Path, args: argparse.Namespace, progress: _Progress
) -> Any:
    """:func:`fxsurgery.check` with the command line's options."""
    from fxsurgery.api import check

    step = (
        f"rewriting towards {to}, validating ({args.precision}), exporting both versions to ONNX "
        f"({args.exporter}) and cross-checking in onnxruntime"
    )
    with progress.step(step):
        return check(model, inputs, to, out_dir, options=options_from(args))


def _write_report(
    report: Any, out_dir: Path, inputs: list[tuple[str, Any]], progress: _Progress, artifacts: Sequence[str] = ARTIFACTS
) -> dict[str, Any]:
    from fxsurgery.artifacts.checkpoint import save_rewritten
    from fxsurgery.report import report_file

    with progress.step("saving the rewritten model"):
        saved = save_rewritten(
            report.surgery.module, tuple(t for _, t in inputs), out_dir, artifacts, report.surgery.program
        )
    saved["report.html"] = "this report drawn (sites, error histograms, op census): fxsurgery report DIR rebuilds it"
    data = report_file(report, saved=saved, command=" ".join(sys.argv), inputs=inputs)
    (out_dir / "report.json").write_text(json.dumps(data, indent=2))
    write_html(data, out_dir / "report.html")
    mode = file_mode()
    for f in out_dir.iterdir():  # one mode for every file (safetensors writes its files private)
        f.chmod(mode)
    return data


# -- demo ------------------------------------------------------------------------------------------------------------


def _demo(args: argparse.Namespace, progress: _Progress) -> int:
    import torch

    from fxsurgery.models import DEMO_INPUT_SHAPE, demo_model
    from fxsurgery.report import moved

    model = demo_model()
    inputs = (torch.randn(DEMO_INPUT_SHAPE, generator=torch.Generator().manual_seed(0)),)
    base = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="fxsurgery-demo-"))
    reports = {}
    try:
        for to in ("conv", "linear"):
            reports[to] = _run_pipeline(model, inputs, to, base / f"to_{to}", args, progress)
    finally:
        if not args.out:
            shutil.rmtree(base, ignore_errors=True)
    reports = {to: moved(r, str(base / f"to_{to}") if args.out else None) for to, r in reports.items()}
    if args.json:
        print(json.dumps({to: r.to_dict() for to, r in reports.items()}, indent=2))
    else:
        print(f"fxsurgery demo: NiNClassifier{tuple(DEMO_INPUT_SHAPE)}, both directions\n")
        print("\n\n".join(f"=== to {to} ===\n{r.summary()}" for to, r in reports.items()))
    return EXIT_OK if all(r.passed for r in reports.values()) else EXIT_MISMATCH


if __name__ == "__main__":
    sys.exit(main())
