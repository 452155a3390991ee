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
from typing import Any, NoReturn

from fxsurgery.artifacts._staging import file_mode, staged_folder
from fxsurgery.artifacts.checkpoint import ARTIFACTS
from fxsurgery.artifacts.report_html import write_html
from fxsurgery.cli.bench import add_bench, add_report, artifacts_list, run_bench, run_report, runtimes_list
from fxsurgery.cli.inputs import (
    DTYPES,
    UsageError,
    check_input_dims,
    check_input_size,
    example_inputs,
    parse_input,
)
from fxsurgery.cli.model import build_model, load_program, load_weights
from fxsurgery.options import RUNTIMES
from fxsurgery.plan.targets import TARGETS

__all__ = ["main"]

EXIT_OK, EXIT_MISMATCH, EXIT_USAGE = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # argparse would exit 2 with usage; keep its code, make it one line
        raise UsageError(f"{message} (see '{self.prog} --help')")


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


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fxsurgery")
    except PackageNotFoundError:  # run from a source tree that is not installed
        return "unknown (not installed)"


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fxsurgery", description="Rewrite Linear <-> Conv2d layers in a PyTorch model, validated.")
    parser.add_argument("--version", action="version", version=f"fxsurgery {_version()}")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--quiet", action="store_true", help="no progress messages on stderr")
        p.add_argument("--json", action="store_true", help="print the report as JSON instead of the summary table")
        p.add_argument("--exporter", choices=("dynamo", "torchscript"), default="dynamo", help="torch.onnx exporter")
        p.add_argument("--provider", action="append", default=None, metavar="EP",
                       help="onnxruntime execution provider (repeatable; default CPUExecutionProvider)")  # fmt: skip
        p.add_argument("--precision", choices=("native", "float64"), default="native",
                       help="validate in the model's dtype, or prove exactness in float64")  # fmt: skip
        p.add_argument("--rtol", type=float, help="tolerance relative to the output scale (default: per dtype)")
        p.add_argument("--opset", type=int, help="ONNX opset (default: the exporter's)")
        p.add_argument("--static-batch", action="store_true", help="export the ONNX files with a fixed batch size")

    rw = sub.add_parser("rewrite", help="rewrite a model, validate, export both versions and cross-check them")
    _model_arguments(rw)
    rw.add_argument("--to", choices=("conv", "linear", "auto"), required=True,
                    help="target layer type, or auto: per site the faster form on --runtime")  # fmt: skip
    rw.add_argument("--runtime", choices=RUNTIMES, default="onnxruntime",
                    help="with --to auto: where to measure")  # fmt: skip
    rw.add_argument("--out", help="output directory (must not exist, or be empty; required unless --dry-run)")
    rw.add_argument("--artifacts", type=artifacts_list, default=ARTIFACTS, metavar="LIST",
                    help="files to write besides report.json, comma-separated: onnx (the two ONNX files; the "
                         "cross-check runs either way), pt2, safetensors (the rewritten weights, the same in the "
                         "original layout, layouts.json), code; all (default) or none")  # fmt: skip
    rw.add_argument("--cross-check-runtimes", type=runtimes_list, default=(), metavar="LIST",
                    help="also cross-check on these runtimes, comma-separated: openvino, executorch (their extras)")
    rw.add_argument("--dry-run", action="store_true",
                    help="only list the sites and what would happen to each (as fxsurgery list); nothing is "
                         "validated or written")  # fmt: skip
    common(rw)

    ls = sub.add_parser("list", help="list the candidate sites and what would happen to each (no validation, no "
                        "export)")  # fmt: skip
    _model_arguments(ls)
    ls.add_argument("--to", choices=("conv", "linear"), required=True, help="target layer type")
    ls.add_argument("--quiet", action="store_true", help="no progress messages on stderr")
    ls.add_argument("--json", action="store_true", help="print the sites as JSON")
    _add_convert(sub)
    add_bench(sub, _model_arguments)
    add_report(sub)
    demo = sub.add_parser("demo", help="run the whole pipeline on the built-in model, both directions")
    demo.add_argument("--out", help="output directory (default: a temporary one, removed afterwards)")
    common(demo)
    return parser


def _model_arguments(p: argparse.ArgumentParser) -> None:
    """The model, its example inputs and the rewrite options, shared by ``rewrite`` and ``list``."""
    p.add_argument("model", help="package.module:callable or path/to/file.py:callable returning an nn.Module "
                                 "(MODEL imports that module and calls that callable with --model-kwargs: it runs "
                                 "their code, as python -c would; give only code you trust), or a .pt2 file "
                                 "(torch.export.save; loaded without unpickling anything but tensors unless "
                                 "--unsafe-pickle)")  # fmt: skip
    p.add_argument("--model-kwargs", default="{}", metavar="JSON",
                   help='keyword arguments for the callable, e.g. \'{"model_name": "resnet18"}\'')  # fmt: skip
    p.add_argument("--input-shape", action="append", default=[], metavar="N,C,H,W[:DTYPE]",
                   help="shape of one positional example input (repeat for several inputs); :int64 (or another "
                        "integer dtype) makes random ids in [0, 2), for token ids and masks")  # fmt: skip
    p.add_argument("--input", action="append", default=[], metavar="NAME=SHAPE[:DTYPE]",
                   help="a keyword example input, as HuggingFace models are called: --input attention_mask=1,8:int64")
    p.add_argument("--frontend", choices=("auto", "fx", "export"), default="auto",
                   help="how the model becomes a graph: torch.fx, torch.export, or auto (fx, and torch.export "
                        "where fx does not trace the whole model)")  # fmt: skip
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype of the model and its inputs")
    p.add_argument("--weights", help="safetensors file, or a state dict saved with torch.save")
    p.add_argument("--unsafe-pickle", action="store_true",
                   help="allow --weights files and .pt2 models that need full unpickling (runs code from the file!); "
                        "without it only tensors are unpickled and a file that needs more is refused")  # fmt: skip
    p.add_argument("--leaf-module", action="append", default=[], help="qualified name fx must not trace into")
    p.add_argument("--exclude", action="append", default=[], help="site name to leave alone")
    p.add_argument("--target", choices=sorted(TARGETS), default=None,
                   help="the deployment target: picks the layouts and leaves alone the patterns it runs badly (each "
                        "choice in the report); rewrite adds the op census after its own conversion where its "
                        "toolchain is installed")  # fmt: skip
    p.add_argument("--batch-layout", choices=("spatial", "batch"), default="",
                   help="linear_to_conv: carry the head as (1, C, 1, N) (one matrix product; the default) or "
                        "(N, C, 1, 1) (the default for --target coreml)")  # fmt: skip
    p.add_argument("--token-layout", action="store_true",
                   help="linear_to_conv: carry transformer tokens (B, S, C) as (B, C, 1, S) and channels-last "
                        "maps as NCHW, so Linears in ViT/Swin/MLP-Mixer blocks and their attention become 1x1 "
                        "convs")  # fmt: skip


def _add_convert(sub: Any) -> None:
    cv = sub.add_parser("convert", help="convert a safetensors checkpoint (file or sharded folder) for the rewritten "
                        "model, or back, tensor by tensor")  # fmt: skip
    cv.add_argument("src", help="a .safetensors file or a checkpoint folder (model.safetensors.index.json)")
    cv.add_argument("dst", help="output folder (must not exist, or be empty)")
    cv.add_argument("--layouts", required=True, help="layouts.json that `fxsurgery rewrite --out DIR` wrote")
    cv.add_argument("--to", choices=("rewritten", "original"), default="rewritten",
                    help="the format to write (default: the rewritten model's)")  # fmt: skip
    cv.add_argument("--json", action="store_true", help="print the summary as JSON")


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = _build_parser().parse_args(argv)
    except UsageError as e:
        return _fail(str(e))
    if args.command is None:
        _build_parser().print_help(sys.stderr)
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

        return _fail(f"{one_line(e)} (an error fxsurgery did not foresee; FXSURGERY_TRACEBACK=1 prints where it "
                     "happened: please report it)")  # fmt: skip


def _convert(args: argparse.Namespace) -> int:
    from fxsurgery.artifacts.convert import convert_checkpoint

    summary = convert_checkpoint(args.layouts, args.src, args.dst, to=args.to)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"wrote {args.dst}: {summary['tensors']} tensors in {len(summary['files'])} file(s), "
              f"{summary['converted']} in the {args.to} format ({summary['moved_bytes']} bytes moved, the rest "
              "copied as they are)")  # fmt: skip
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
        program, positional, named = load_program(args.model, bool(specs), {
            "--weights": bool(args.weights), "--model-kwargs": args.model_kwargs != "{}",
            "--dtype": args.dtype != "float32"}, args.unsafe_pickle)  # fmt: skip
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
    return (tuple(t for (name, _, _), t in zip(specs, inputs) if name is None),
            {name: t for (name, _, _), t in zip(specs, inputs) if name is not None})  # fmt: skip


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
        res = rewrite(model, (*positional, named) if named else positional, args.to, validate=False,
                      leaf_modules=tuple(args.leaf_module), exclude=tuple(args.exclude), frontend=args.frontend,
                      batch_layout=args.batch_layout, token_layout=args.token_layout, target=args.target)  # fmt: skip
    data = res.to_dict()
    print(json.dumps({k: data[k] for k in ("direction", "frontend", "sites", "notes")}, indent=2) if args.json
          else res.summary())  # fmt: skip
    return EXIT_OK


def _run_pipeline(model: Any, inputs: tuple, to: str, out_dir: Path, args: argparse.Namespace,
                  progress: _Progress) -> Any:  # fmt: skip
    """:func:`fxsurgery.check` with the command line's options."""
    from fxsurgery.api import check

    step = (f"rewriting towards {to}, validating ({args.precision}), exporting both versions to ONNX "
            f"({args.exporter}) and cross-checking in onnxruntime")  # fmt: skip
    with progress.step(step):
        return check(model, inputs, to, out_dir, exporter=args.exporter,
                     providers=args.provider or ("CPUExecutionProvider",), precision=args.precision,
                     leaf_modules=tuple(getattr(args, "leaf_module", ())), exclude=tuple(getattr(args, "exclude", ())),
                     batch_layout=getattr(args, "batch_layout", ""), target=getattr(args, "target", None),
                     token_layout=getattr(args, "token_layout", False),
                     runtime=getattr(args, "runtime", "onnxruntime"),
                     frontend=getattr(args, "frontend", "auto"), opset=args.opset,
                     dynamic_batch=not args.static_batch, runtimes=getattr(args, "cross_check_runtimes", ()),
                     **({"rtol": args.rtol} if args.rtol else {}))  # fmt: skip


def _write_report(report: Any, out_dir: Path, inputs: list[tuple[str, Any]], progress: _Progress,
                  artifacts: Sequence[str] = ARTIFACTS) -> dict[str, Any]:  # fmt: skip
    from fxsurgery.artifacts.checkpoint import save_rewritten
    from fxsurgery.report import report_file

    with progress.step("saving the rewritten model"):
        saved = save_rewritten(report.surgery.module, tuple(t for _, t in inputs), out_dir, artifacts,
                               report.surgery.program)  # fmt: skip
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
