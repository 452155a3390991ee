"""The ``fxsurgery`` command line.

Exit codes: 0 everything passed, 1 validation or the ONNX cross-check found a mismatch, 2 bad usage or bad input.
Errors are one line on stderr, without a traceback. Output is written to a temporary folder beside ``--out`` and
renamed into place at the end, so a failed run leaves nothing that looks valid.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

from fxsurgery.cli_inputs import (
    DTYPES,
    UsageError,
    check_input_dims,
    check_input_size,
    example_inputs,
    parse_input,
)

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


_UMASK = os.umask(0)
os.umask(_UMASK)


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
    rw.add_argument("model", help="package.module:callable or path/to/file.py:callable returning an nn.Module")
    rw.add_argument("--model-kwargs", default="{}", metavar="JSON",
                    help='keyword arguments for the callable, e.g. \'{"model_name": "resnet18"}\'')  # fmt: skip
    rw.add_argument("--to", choices=("conv", "linear", "auto"), required=True,
                    help="target layer type, or auto: per site the faster form on --runtime")  # fmt: skip
    rw.add_argument("--runtime", choices=("onnxruntime", "torch"), default="onnxruntime",
                    help="with --to auto: where to measure")  # fmt: skip
    rw.add_argument("--input-shape", action="append", default=[], metavar="N,C,H,W[:DTYPE]",
                    help="shape of one positional example input (repeat for several inputs); :int64 (or another "
                         "integer dtype) makes random ids in [0, 2), for token ids and masks")  # fmt: skip
    rw.add_argument("--input", action="append", default=[], metavar="NAME=SHAPE[:DTYPE]",
                    help="a keyword example input, as HuggingFace models are called: --input attention_mask=1,8:int64")
    rw.add_argument("--frontend", choices=("auto", "fx", "export"), default="auto",
                    help="how the model becomes a graph: torch.fx, torch.export, or auto (fx, and torch.export "
                         "where fx does not trace the whole model)")  # fmt: skip
    rw.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype of the model and its inputs")
    rw.add_argument("--out", required=True, help="output directory (must not exist, or be empty)")
    rw.add_argument("--weights", help="safetensors file, or a state dict saved with torch.save")
    rw.add_argument("--unsafe-pickle", action="store_true",
                    help="allow --weights files that need full unpickling (runs code from the file!)")  # fmt: skip
    rw.add_argument("--leaf-module", action="append", default=[], help="qualified name fx must not trace into")
    rw.add_argument("--exclude", action="append", default=[], help="site name to leave alone")
    rw.add_argument("--batch-layout", choices=("spatial", "batch"), default="spatial",
                    help="linear_to_conv: carry the head as (1, C, 1, N) (one matrix product) or "
                         "(N, C, 1, 1)")  # fmt: skip
    rw.add_argument("--token-layout", action="store_true",
                    help="linear_to_conv: carry transformer tokens (B, S, C) as (B, C, 1, S) and channels-last "
                         "maps as NCHW, so Linears in ViT/Swin/MLP-Mixer blocks and their attention become 1x1 "
                         "convs")  # fmt: skip
    common(rw)

    _add_convert(sub)
    demo = sub.add_parser("demo", help="run the whole pipeline on the built-in model, both directions")
    demo.add_argument("--out", help="output directory (default: a temporary one, removed afterwards)")
    common(demo)
    return parser


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
        return _rewrite(args, progress)
    except (UsageError, InputError, TraceError) as e:
        return _fail(str(e))
    except SurgeryError as e:
        return _fail(str(e), EXIT_MISMATCH)
    except SystemExit as e:  # the model's own code called sys.exit: that is no result
        return _fail(f"the model's code exited (SystemExit: {e.code}) before the rewrite finished")
    except KeyboardInterrupt:
        return _fail("interrupted", 130)


def _convert(args: argparse.Namespace) -> int:
    from fxsurgery.convert import convert_checkpoint

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


def load_factory(spec: str) -> Callable[[], Any]:
    """Resolve ``package.module:callable`` or ``path/to/file.py:callable``."""
    if ":" not in spec:
        raise UsageError(f"MODEL must be package.module:callable or file.py:callable, got {spec!r}")
    where, _, name = spec.rpartition(":")
    if where.endswith(".py") or os.sep in where:
        path = Path(where)
        if not path.is_file():
            raise UsageError(f"model file not found: {where}")
        module_spec = importlib.util.spec_from_file_location(f"_fxsurgery_user_{path.stem}", path)
        module = importlib.util.module_from_spec(module_spec)  # type: ignore[arg-type]
        sys.path.insert(0, str(path.parent.resolve()))
        try:
            module_spec.loader.exec_module(module)  # type: ignore[union-attr]
        except (Exception, SystemExit) as e:
            raise UsageError(f"cannot import {where}: {type(e).__name__}: {e}") from e
        finally:
            sys.path.pop(0)
    else:
        try:
            module = importlib.import_module(where)
        except (Exception, SystemExit) as e:
            raise UsageError(f"cannot import module {where!r}: {type(e).__name__}: {e}") from e
    obj = module
    for part in name.split("."):
        if not hasattr(obj, part):
            raise UsageError(f"{where} has no attribute {name!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UsageError(f"{spec} is not callable: expected a function or class returning an nn.Module")
    return obj


def build_model(spec: str, kwargs_json: str = "{}") -> Any:
    from torch import nn

    try:
        kwargs = json.loads(kwargs_json)
    except ValueError as e:
        raise UsageError(f"--model-kwargs is not JSON: {e}") from e
    if not isinstance(kwargs, dict):
        raise UsageError(f"--model-kwargs must be a JSON object of keyword arguments, got {kwargs_json!r}")
    factory = load_factory(spec)
    try:
        model = factory(**kwargs)
    except SystemExit as e:  # user code that exits is not a result: say so, never "passed"
        raise UsageError(f"calling {spec}() exited (SystemExit: {e.code}) instead of returning a model") from e
    except Exception as e:
        raise UsageError(f"calling {spec}() failed: {type(e).__name__}: {e}") from e
    if not isinstance(model, nn.Module):
        raise UsageError(f"{spec}() returned {type(model).__name__}, not a torch.nn.Module")
    return model


def load_weights(model: Any, path: str, allow_pickle: bool) -> None:
    import torch

    file = Path(path)
    if not file.is_file():
        raise UsageError(f"weights file not found: {path}")
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(file))
        else:
            state = torch.load(str(file), map_location="cpu", weights_only=not allow_pickle)
    except Exception as e:
        hint = "" if allow_pickle else " (only tensors are loaded by default; see --unsafe-pickle)"
        raise UsageError(f"cannot read weights file {path}: {type(e).__name__}: {str(e).splitlines()[0]}{hint}") from e
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # type: ignore[assignment]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UsageError(f"weights file {path} does not hold a state dict of tensors")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        expected = model.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        shapes = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
        parts = [f"{label} {keys[:3]}{'...' if len(keys) > 3 else ''}"
                 for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes))
                 if keys]  # fmt: skip
        raise UsageError(f"weights file {path} does not match the model: {'; '.join(parts) or e}") from e


@contextmanager
def staged_output(out: str) -> Iterator[Path]:
    """A temporary folder beside ``out`` that becomes ``out`` only if the block completes."""
    target = Path(out)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise UsageError(f"output directory {out} exists and is not empty; choose another --out or remove it")
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.is_dir():
        raise UsageError(f"cannot write to {out}: parent directory {parent} does not exist")
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=parent))
    except OSError as e:
        raise UsageError(f"cannot write to {out}: {e.strerror or e}") from e
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    tmp.chmod(0o777 & ~_UMASK)  # mkdtemp makes it private; the result is an ordinary folder
    if target.exists():
        target.rmdir()
    os.replace(tmp, target)


def _rewrite(args: argparse.Namespace, progress: _Progress) -> int:
    import torch

    from fxsurgery.report import moved

    specs = [parse_input(s, "--input-shape", args.dtype) for s in args.input_shape]
    specs += [parse_input(s, "--input", args.dtype) for s in args.input]
    if not specs:
        raise UsageError("no example input: give --input-shape N,C,H,W (and/or --input NAME=SHAPE[:DTYPE])")
    dtype = getattr(torch, args.dtype)
    check_input_size([shape for _, shape, _ in specs], dtype)
    with staged_output(args.out) as tmp:
        with progress.step(f"building {args.model}"):
            model = build_model(args.model, args.model_kwargs)
            if args.weights:
                load_weights(model, args.weights, args.unsafe_pickle)
            model = model.to(dtype).eval()
        inputs = example_inputs(specs)
        positional = tuple(t for (name, _, _), t in zip(specs, inputs) if name is None)
        named = {name: t for (name, _, _), t in zip(specs, inputs) if name is not None}
        check_input_dims(model, positional)
        report = _run_pipeline(model, (*positional, named) if named else positional, args.to, tmp, args, progress)
        report = moved(report, args.out)  # the staging folder becomes --out below
        names = [f"input_{i}" for i in range(len(positional))] + list(named)
        data = _write_report(report, tmp, list(zip(names, (*positional, *named.values()))), progress)
    print(json.dumps(data, indent=2) if args.json else report.summary())
    return EXIT_OK if report.passed else EXIT_MISMATCH


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
                     batch_layout=getattr(args, "batch_layout", "spatial"),
                     token_layout=getattr(args, "token_layout", False),
                     runtime=getattr(args, "runtime", "onnxruntime"),
                     frontend=getattr(args, "frontend", "auto"), opset=args.opset,
                     dynamic_batch=not args.static_batch, **({"rtol": args.rtol} if args.rtol else {}))  # fmt: skip


def _write_report(report: Any, out_dir: Path, inputs: list[tuple[str, Any]], progress: _Progress) -> dict[str, Any]:
    from fxsurgery.checkpoint import save_rewritten
    from fxsurgery.report import report_file

    with progress.step("saving the rewritten model"):
        saved = save_rewritten(report.surgery.module, tuple(t for _, t in inputs), out_dir)
    data = report_file(report, saved=saved, command=" ".join(sys.argv), inputs=inputs)
    (out_dir / "report.json").write_text(json.dumps(data, indent=2))
    for f in out_dir.iterdir():  # one mode for every file (safetensors writes its files private)
        f.chmod(0o666 & ~_UMASK)
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
