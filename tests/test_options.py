"""One options object: the cross-check settings are options too, checked where they are given, and the command line
builds its Options in one place (cli.options.options_from) for every subcommand."""

from __future__ import annotations

from pathlib import Path

import pytest

import fxsurgery
from fxsurgery.cli.options import options_from
from fxsurgery.cli.parser import build_parser

CLI = Path(fxsurgery.__file__).parent / "cli"


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"exporter": "tflite"}, "unknown exporter 'tflite'"),
        ({"runtimes": "openvino"}, "runtimes must be a sequence of names"),
        ({"runtimes": ("tvm",)}, "unknown cross-check runtime 'tvm'"),
        ({"opset": "17"}, "opset must be an int"),
        ({"dynamic_batch": "no"}, "dynamic_batch must be True or False"),
        ({"providers": "CPUExecutionProvider"}, "providers must be a sequence of names"),
    ],
)
def test_cross_check_settings_are_checked_as_options(given, message):
    with pytest.raises(fxsurgery.InputError, match=message):
        fxsurgery.Options(**given)


def test_the_command_line_gives_the_options_it_was_given_and_the_defaults_otherwise():
    args = build_parser().parse_args(
        ["rewrite", "m:f", "--to", "conv", "--input-shape", "1,3,8,8", "--out", "o", "--exclude", "fc",
         "--leaf-module", "body", "--target", "coreml", "--token-layout", "--precision", "float64", "--rtol", "1e-5",
         "--exporter", "torchscript", "--opset", "17", "--static-batch", "--frontend", "fx"]
    )  # fmt: skip
    expected = fxsurgery.Options(
        exclude=("fc",), leaf_modules=("body",), target="coreml", token_layout=True, precision="float64", rtol=1e-5,
        exporter="torchscript", opset=17, dynamic_batch=False, frontend="fx",
    )  # fmt: skip
    assert options_from(args) == expected
    assert options_from(args).batch_layout == "batch"  # the target's, as from Python
    plain = build_parser().parse_args(["list", "m:f", "--to", "linear", "--input-shape", "1,3,8,8"])
    assert options_from(plain, validate=False) == fxsurgery.Options(validate=False)


def test_no_other_part_of_the_command_line_maps_arguments_to_options():
    for path in CLI.glob("*.py"):
        if path.name == "options.py":
            continue
        text = path.read_text()
        for keyword in ("leaf_modules=", "token_layout=", "batch_layout=", "exporter=", "precision=", "Options("):
            assert keyword not in text, f"{path.name} builds options itself ({keyword})"
