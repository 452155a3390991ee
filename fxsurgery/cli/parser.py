"""The command line's parser: subcommands, their options and help, built in one place."""

from __future__ import annotations

import argparse
from typing import Any, NoReturn

from fxsurgery.artifacts import ARTIFACTS
from fxsurgery.cli.bench import add_bench, add_report, artifacts_list, runtimes_list
from fxsurgery.cli.huggingface import TASKS
from fxsurgery.cli.inputs import DTYPES, UsageError
from fxsurgery.runtimes.registry import RUNTIMES, named

__all__ = ["build_parser"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # argparse would exit 2 with usage; keep its code, make it one line
        raise UsageError(f"{message} (see '{self.prog} --help')")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fxsurgery")
    except PackageNotFoundError:  # run from a source tree that is not installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fxsurgery", description="Rewrite Linear <-> Conv2d layers in a PyTorch model, validated.")
    parser.add_argument("--version", action="version", version=f"fxsurgery {_version()}")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)

    _add_rewrite(sub)

    ls = sub.add_parser(
        "list", help="list the candidate sites and what would happen to each (no validation, no export)"
    )
    _model_arguments(ls)
    ls.add_argument("--to", choices=("conv", "linear"), required=True, help="target layer type")
    _output(ls).add_argument("--fail-if-unchanged", action="store_true", help=_UNCHANGED_HELP)
    _add_convert(sub)
    add_bench(sub, _model_arguments)
    add_report(sub)
    demo = sub.add_parser("demo", help="run the whole pipeline on the built-in model, both directions")
    demo.add_argument("--out", help="output directory (default: a temporary one, removed afterwards)")
    _common(demo)
    return parser


def _output(p: argparse.ArgumentParser) -> Any:
    """The group of options about what is printed; returned for the subcommand's own additions."""
    g = p.add_argument_group("output")
    g.add_argument("--quiet", action="store_true", help="no progress messages on stderr")
    g.add_argument(
        "-v", "--verbose", action="store_true", help="also the third-party logs fxsurgery quiets as known-harmless"
    )
    g.add_argument("--json", action="store_true", help="print the report as JSON instead of the summary table")
    return g


def _common(p: argparse.ArgumentParser) -> None:
    """The options of every subcommand that validates and cross-checks."""
    _output(p)
    p = p.add_argument_group("checks: validation, ONNX export and cross-check")  # type: ignore[assignment]
    p.add_argument("--exporter", choices=("dynamo", "torchscript"), default="dynamo", help="torch.onnx exporter")
    p.add_argument(
        "--provider",
        action="append",
        default=None,
        metavar="EP",
        help="onnxruntime execution provider (repeatable; default CPUExecutionProvider)",
    )
    p.add_argument(
        "--precision",
        choices=("native", "float64"),
        default="native",
        help="validate in the model's dtype, or prove exactness in float64",
    )
    p.add_argument("--rtol", type=float, help="tolerance relative to the output scale (default: per dtype)")
    p.add_argument("--opset", type=int, help="ONNX opset (default: the exporter's)")
    p.add_argument(
        "--static-batch",
        action="store_true",
        help="capture and export at the example's batch size, fixed (rewritten graph and ONNX files)",
    )


_UNCHANGED_HELP = "exit with code 3 when no site is rewritten (the model would be returned unchanged)"

_EXAMPLES = """examples:
  fxsurgery rewrite torchvision.models.resnet18 --input-shape 1,3,224,224 --to conv --out out/
  fxsurgery rewrite ./bert-dir --task text-classification --to conv --token-layout --target onnxruntime --out out/
  fxsurgery rewrite my_models.py:build --weights trained.safetensors --input-shape 1,3,32,32 --to linear --out out/
  fxsurgery rewrite exported.pt2 --to conv --target executorch-xnnpack --out out/
  fxsurgery check ...   (the same command, by the API's name)"""


def _add_rewrite(sub: Any) -> None:
    parser = sub.add_parser(
        "rewrite",
        aliases=["check"],
        help="rewrite a model, validate, export both versions and cross-check them (alias: check)",
        description="Rewrite a model towards --to, validate the rewrite numerically, export both versions to ONNX "
        "and cross-check them in onnxruntime; the files and report.json/report.html land in --out.",
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _model_arguments(parser)
    rw = parser.add_argument_group("direction and output files")
    rw.add_argument(
        "--to",
        choices=("conv", "linear", "auto"),
        required=True,
        help="target layer type, or auto: per site the faster form on --runtime",
    )
    rw.add_argument("--runtime", choices=named("time"), default="onnxruntime", help="with --to auto: where to measure")
    rw.add_argument("--out", help="output directory (must not exist, or be empty; required unless --dry-run)")
    rw.add_argument(
        "--artifacts",
        type=artifacts_list,
        default=ARTIFACTS,
        metavar="LIST",
        help="files to write besides report.json, comma-separated: onnx (the two ONNX files; the "
        "cross-check runs either way), pt2, safetensors (the rewritten weights, the same in the "
        "original layout, layouts.json), code; all (default) or none",
    )
    rw.add_argument(
        "--cross-check-runtimes",
        type=runtimes_list,
        default=(),
        metavar="LIST",
        help="also cross-check on these runtimes, comma-separated: openvino, executorch (their extras)",
    )
    rw.add_argument(
        "--dry-run",
        action="store_true",
        help="only list the sites and what would happen to each (as fxsurgery list); nothing is validated or written",
    )
    rw.add_argument("--fail-if-unchanged", action="store_true", help=_UNCHANGED_HELP)
    _common(parser)


def _model_arguments(p: argparse.ArgumentParser) -> None:
    """The model, its example inputs and the rewrite options, shared by ``rewrite`` and ``list``."""
    p.add_argument(
        "model",
        help="package.module:callable or path/to/file.py:callable returning an nn.Module "
        "(MODEL imports that module and calls that callable with --model-kwargs: it runs "
        "their code, as python -c would; give only code you trust), or a .pt2 file "
        "(torch.export.save; loaded without unpickling anything but tensors unless "
        "--unsafe-pickle), or a HuggingFace model folder (config.json and weights; a Hub id "
        "needs network), with --task",
    )
    parser = p
    p = p.add_argument_group("model and example inputs")  # type: ignore[assignment]
    p.add_argument(
        "--task",
        choices=tuple(TASKS),
        help="a HuggingFace MODEL: the Auto class to load it with (default: the architecture its config names); "
        "example inputs are made from the config when no --input-shape/--input is given",
    )
    p.add_argument(
        "--model-kwargs",
        default="{}",
        metavar="JSON",
        help='keyword arguments for the callable, e.g. \'{"model_name": "resnet18"}\'',
    )
    p.add_argument(
        "--input-shape",
        action="append",
        default=[],
        metavar="N,C,H,W[:DTYPE]",
        help="shape of one positional example input (repeat for several inputs); :int64 (or another "
        "integer dtype) makes random ids in [0, 2), for token ids and masks",
    )
    p.add_argument(
        "--input",
        action="append",
        default=[],
        metavar="NAME=SHAPE[:DTYPE]",
        help="a keyword example input, as HuggingFace models are called: --input attention_mask=1,8:int64",
    )
    p.add_argument(
        "--frontend",
        choices=("auto", "fx", "export"),
        default="auto",
        help="how the model becomes a graph: torch.fx, torch.export, or auto (fx, and torch.export "
        "where fx does not trace the whole model)",
    )
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype of the model and its inputs")
    p.add_argument("--weights", help="safetensors file, or a state dict saved with torch.save")
    p.add_argument(
        "--unsafe-pickle",
        action="store_true",
        help="allow --weights files and .pt2 models that need full unpickling (runs code from the file!); "
        "without it only tensors are unpickled and a file that needs more is refused",
    )
    _rule_arguments(parser.add_argument_group("what is rewritten, and how"))


def _rule_arguments(p: Any) -> None:
    """What is traced and rewritten, and how: leaves, exclusions, the target and the layouts."""
    p.add_argument("--leaf-module", action="append", default=[], help="qualified name fx must not trace into")
    p.add_argument("--exclude", action="append", default=[], help="site name to leave alone")
    p.add_argument(
        "--target",
        choices=sorted(r.target for r in RUNTIMES.values() if r.target),
        default=None,
        help="the deployment target: picks the layouts and leaves alone the patterns it runs badly (each "
        "choice in the report); rewrite adds the op census after its own conversion where its "
        "toolchain is installed",
    )
    p.add_argument(
        "--batch-layout",
        choices=("spatial", "batch"),
        default="",
        help="linear_to_conv: carry the head as (1, C, 1, N) (one matrix product; the default) or "
        "(N, C, 1, 1) (the default for --target coreml)",
    )
    p.add_argument(
        "--token-layout",
        action="store_true",
        help="linear_to_conv: carry transformer tokens (B, S, C) as (B, C, 1, S) and channels-last "
        "maps as NCHW, so Linears in ViT/Swin/MLP-Mixer blocks and their attention become 1x1 "
        "convs",
    )
    p.add_argument(
        "--quantize",
        choices=("int8",),
        default=None,
        help="the rewritten model will be quantized: emit the forms quantizers keep whole (LayerNorm and attention "
        "as one op each); check also quantizes both versions (PT2E XNNPACKQuantizer, per-channel; onnxruntime "
        "static QDQ for the ONNX files) and compares them (needs fxsurgery[quant])",
    )


def _add_convert(sub: Any) -> None:
    cv = sub.add_parser(
        "convert",
        help="convert a safetensors checkpoint (file or sharded folder) for the rewritten "
        "model, or back, tensor by tensor",
    )
    cv.add_argument("src", help="a .safetensors file or a checkpoint folder (model.safetensors.index.json)")
    cv.add_argument("dst", help="output folder (must not exist, or be empty)")
    cv.add_argument("--layouts", required=True, help="layouts.json that `fxsurgery rewrite --out DIR` wrote")
    cv.add_argument(
        "--to",
        choices=("rewritten", "original"),
        default="rewritten",
        help="the format to write (default: the rewritten model's)",
    )
    cv.add_argument("--json", action="store_true", help="print the summary as JSON")
