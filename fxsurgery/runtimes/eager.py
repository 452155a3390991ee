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
        tensors = [*module.parameters(), *module.buffers(), *(t for t in inputs if isinstance(t, torch.Tensor))]
        cuda = next((t.device for t in tensors if t.is_cuda), None)

        def run_torch() -> Any:
            with torch.no_grad():
                out = module(*inputs)
            if cuda is not None:  # a GPU runs what the call queued after it returns: time the work, not the queuing
                torch.cuda.synchronize(cuda)
            return out

        return run_torch
