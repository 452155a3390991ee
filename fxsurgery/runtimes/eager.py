"""torch itself, eager: the baseline every other runtime is timed and compared against."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fxsurgery.runtimes.registry import Backend

__all__ = ["Eager"]


class Eager(Backend):
    def timer(self, module: nn.Module, inputs: tuple[Any, ...], workdir: Path, threads: int, exporter: str) -> Callable:
        def run_torch() -> Any:
            with torch.no_grad():
                return module(*inputs)

        return run_torch
