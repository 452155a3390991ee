"""The command line's example inputs: ``--input-shape`` / ``--input`` parsed, checked against memory and the model,
and made (seeded random values)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

__all__ = [
    "DTYPES",
    "INT_DTYPES",
    "UsageError",
    "parse_shape",
    "parse_input",
    "example_inputs",
    "check_input_size",
    "check_input_dims",
    "available_memory",
    "INPUT_MEMORY_SHARE",
]

DTYPES = ("float32", "float64", "float16", "bfloat16")


class UsageError(Exception):
    """Bad command-line input; its message is printed as one line and the exit code is 2."""


def parse_shape(text: str, flag: str = "--input-shape") -> tuple[int, ...]:
    try:
        shape = tuple(int(p) for p in text.replace("x", ",").split(","))
    except ValueError:
        message = f"malformed {flag} {text!r}: expected comma-separated integers like 1,3,224,224"
        raise UsageError(message) from None
    if not shape or any(d <= 0 for d in shape):
        raise UsageError(f"malformed {flag} {text!r}: every dimension must be a positive integer")
    return shape


#: Integer dtypes an example input may have (token ids, masks): random values in [0, 2) are valid for any vocabulary.
INT_DTYPES = ("int64", "int32", "bool")


def parse_input(text: str, flag: str, default_dtype: str) -> tuple[str | None, tuple[int, ...], str]:
    """``[NAME=]SHAPE[:DTYPE]`` -> (name, shape, dtype)."""
    name, _, rest = text.rpartition("=") if flag == "--input" else ("", "", text)
    if flag == "--input" and not name.isidentifier():
        raise UsageError(f"malformed --input {text!r}: expected NAME=SHAPE[:DTYPE], e.g. attention_mask=1,8:int64")
    shape_text, _, dtype = rest.partition(":")
    dtype = dtype or default_dtype
    if dtype not in (*DTYPES, *INT_DTYPES):
        known = ", ".join((*DTYPES, *INT_DTYPES))
        raise UsageError(f"malformed {flag} {text!r}: unknown dtype {dtype!r} (one of {known})")
    return name or None, parse_shape(shape_text, flag), dtype


#: The example inputs, the activations they cause and the validation copies must fit: refuse inputs larger than this
#: share of the memory available.
INPUT_MEMORY_SHARE = 0.05


def example_inputs(specs: list[tuple[str | None, tuple[int, ...], str]]) -> tuple[Any, ...]:
    """Random example inputs (seeded): normal floats, or integers in [0, 2) (valid token ids and masks)."""
    import torch

    gen = torch.Generator().manual_seed(0)
    made = []
    for _, shape, dtype in specs:
        values = torch.randint(0, 2, shape, generator=gen) if dtype in INT_DTYPES else torch.randn(shape, generator=gen)
        made.append(values.to(getattr(torch, dtype)))
    return tuple(made)


def check_input_size(shapes: list[tuple[int, ...]], dtype: Any) -> None:
    """Refuse example inputs that cannot fit in memory, up front, with the numbers."""
    import math

    import torch

    size = sum(math.prod(s) for s in shapes) * torch.empty((), dtype=dtype).element_size()
    available = available_memory()
    if size > INPUT_MEMORY_SHARE * available:
        raise UsageError(
            f"--input-shape asks for {size / 2**30:.3g} GiB of example inputs; with "
            f"{available / 2**30:.3g} GiB of memory available the inputs may use at most "
            f"{INPUT_MEMORY_SHARE:.0%} of it (the model's activations and the validation copies need the "
            "rest): use a smaller shape"
        )


def available_memory() -> int:
    """Bytes of memory available (MemAvailable on Linux; the physical size elsewhere)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def check_input_dims(model: Any, inputs: tuple) -> None:
    """Catch the commonest shape mistake early: an input whose rank the model's first layer cannot take."""
    from torch import nn

    first = next((m for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear))), None)
    if first is None or len(inputs) != 1:
        return
    wants: dict[type, tuple[int, int]] = {nn.Conv2d: (3, 4), nn.Conv1d: (2, 3)}
    want = wants.get(type(first))
    if want and inputs[0].dim() not in want:
        raise UsageError(
            f"--input-shape has {inputs[0].dim()} dims but the model starts with {type(first).__name__}, which takes "
            f"{want[1]}-D (N, C, ...) input"
        )
