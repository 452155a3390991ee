"""The ``fxsurgery`` command line.

Exit codes: 0 everything passed, 1 validation or the ONNX cross-check found a mismatch, 2 bad usage or bad input,
3 nothing was rewritten and ``--fail-if-unchanged`` was given.
Errors are one line on stderr, without a traceback. Output is written to a temporary folder beside ``--out`` and
renamed into place at the end, so a failed run leaves nothing that looks valid.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fxsurgery.artifacts import ARTIFACTS
from fxsurgery.artifacts._staging import file_mode, staged_folder
from fxsurgery.cli import huggingface as hf
from fxsurgery.cli.bench import run_bench, run_report
from fxsurgery.cli.inputs import (
    UsageError,
    check_input_dims,
    check_input_size,
    example_inputs,
    parse_input,
)
from fxsurgery.cli.model import build_model, load_program, load_weights
from fxsurgery.cli.parser import build_parser

__all__ = ["main"]

EXIT_OK, EXIT_MISMATCH, EXIT_USAGE, EXIT_UNCHANGED = 0, 1, 2, 3


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
    progress = _Progress(getattr(args, "quiet", False))
    with _third_party_quiet(getattr(args, "verbose", False)), _sub_steps(progress.quiet):
        return _dispatch(args, progress)


#: Loggers whose messages are known to be harmless around the steps fxsurgery reports on itself: the exporter's
#: "torchvision is not installed" and constant-folding notices, coremltools' and OpenVINO's progress, torchao's
#: enum registrations ("is now natively supported by torch.compile", on importing transformers). Shown with -v.
_NOISY = ("torch.onnx", "torch.utils._pytree", "onnxscript", "coremltools", "openvino", "executorch")


@contextmanager
def _third_party_quiet(verbose: bool) -> Iterator[None]:
    """Known-harmless third-party logs and warnings quieted while the command runs (not with ``-v``); their levels
    and the warning filters are restored afterwards."""
    import warnings

    from fxsurgery.errors import quiet_loggers

    if verbose:
        yield
        return
    with quiet_loggers(*_NOISY), warnings.catch_warnings():
        for package in _NOISY:
            warnings.filterwarnings("ignore", module=rf"{package}(\..*)?$")
        yield


@contextmanager
def _sub_steps(quiet: bool) -> Iterator[None]:
    """The library's sub-step progress (:mod:`fxsurgery.progress`) on stderr while the command runs."""
    from fxsurgery.progress import log

    if quiet:
        yield
        return
    handler = _StepLines()
    _SHOWN.append(handler)
    level, propagate = log.level, log.propagate
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        yield
    finally:
        _SHOWN.remove(handler)
        log.removeHandler(handler)
        log.setLevel(level)
        log.propagate = propagate


class _StepLines(logging.Handler):
    """Each sub-step on one line of stderr: ``what ...`` when it starts, its time appended when it ends (on a line of
    its own when something else was printed in between)."""

    def __init__(self) -> None:
        super().__init__()
        self.open: str | None = None

    def emit(self, record: logging.LogRecord) -> None:
        what, seconds = getattr(record, "step", None), getattr(record, "seconds", None)
        if seconds is not None and what == self.open:
            text = f" {seconds:.1f}s\n"
        else:
            text = ("\n" if self.open else "") + f"fxsurgery:   {record.getMessage()}"
            text += "" if seconds is None and what is not None else "\n"
        self.open = what if seconds is None else None
        sys.stderr.write(text)
        sys.stderr.flush()


#: The sub-step handlers showing now (one per running command).
_SHOWN: list[_StepLines] = []


def _dispatch(args: argparse.Namespace, progress: _Progress) -> int:
    from fxsurgery.errors import InputError, SurgeryError, TraceError

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
    except BrokenPipeError:  # the reader stopped reading (| head): not a failure of the run, and nothing to say
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - the interpreter flushes stdout at exit
        return 141
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
    if _SHOWN and _SHOWN[-1].open:  # a sub-step's line the error cut short: the error starts a line of its own
        print(file=sys.stderr)
        _SHOWN[-1].open = None
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
    dtype = getattr(torch, args.dtype)
    huggingface = hf.is_folder(args.model) or (args.task is not None and hf.is_hub_id(args.model))
    if args.task is not None and not huggingface:
        raise UsageError(f"--task applies to a HuggingFace model (a folder holding config.json), not {args.model!r}")
    if not specs and not huggingface:
        raise UsageError("no example input: give --input-shape N,C,H,W (and/or --input NAME=SHAPE[:DTYPE])")
    check_input_size([shape for _, shape, _ in specs], dtype)
    with progress.step(f"building {args.model}"):
        model = (
            hf.load(args.model, args.task, dtype, args.model_kwargs)
            if huggingface
            else build_model(args.model, args.model_kwargs)
        )
        if args.weights:
            load_weights(model, args.weights, args.unsafe_pickle)
        model = model.to(dtype).eval()
    if not specs:  # a HuggingFace model: inputs made from its config, the sequence axis dynamic
        args.dynamic_sequence = True
        return model, (), hf.example_inputs(model)
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
    from fxsurgery.artifacts.report_json import moved

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
    if not report.passed:
        return EXIT_MISMATCH
    if report.surgery.unchanged():
        print(f"fxsurgery: warning: {report.surgery.unchanged()}", file=sys.stderr)
        return EXIT_UNCHANGED if args.fail_if_unchanged else EXIT_OK
    return EXIT_OK


def _list(args: argparse.Namespace, progress: _Progress) -> int:
    from fxsurgery.api import rewrite
    from fxsurgery.cli.options import options_from

    model, positional, named = _model_and_inputs(args, progress)
    with progress.step(f"tracing and matching the rules towards {args.to} (no validation, no export)"):
        res = rewrite(
            model, (*positional, named) if named else positional, args.to, options=options_from(args, validate=False)
        )
    data = res.to_dict()
    print(
        json.dumps({"dry_run": True, **{k: data[k] for k in ("direction", "frontend", "sites", "notes")}}, indent=2)
        if args.json
        else res.summary(dry_run=True)
    )
    return EXIT_UNCHANGED if res.unchanged() and getattr(args, "fail_if_unchanged", False) else EXIT_OK


def _run_pipeline(
    model: Any, inputs: tuple, to: str, out_dir: Path, args: argparse.Namespace, progress: _Progress
) -> Any:
    """:func:`fxsurgery.check` with the command line's options."""
    from fxsurgery.api import check
    from fxsurgery.cli.options import options_from

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
    from fxsurgery.artifacts.report_html import write_html
    from fxsurgery.artifacts.report_json import report_file

    with progress.step("saving the rewritten model"):
        saved = save_rewritten(
            report.surgery.module, tuple(t for _, t in inputs), out_dir, artifacts, report.surgery.program
        )
    census = report.target["census"] if report.target else {}
    for label, name in census.get("files", {}).items():
        saved[name] = f"the {label} model as {census['toolchain']} deploys it (the target's own conversion)"
    saved["report.html"] = "this report drawn (sites, error histograms, op census): fxsurgery report DIR rebuilds it"
    data = report_file(report, saved=saved, command=shlex.join(sys.argv), inputs=inputs)
    (out_dir / "report.json").write_text(json.dumps(data, indent=2))
    write_html(data, out_dir / "report.html")
    mode = file_mode()
    for f in out_dir.iterdir():  # one mode for every file (safetensors writes its files private)
        f.chmod(mode)
    return data


# -- demo ------------------------------------------------------------------------------------------------------------


def _demo(args: argparse.Namespace, progress: _Progress) -> int:
    import torch

    from fxsurgery.artifacts.report_json import moved
    from fxsurgery.models import DEMO_INPUT_SHAPE, demo_model

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
