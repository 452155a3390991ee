"""The one onnxruntime session factory (used by the cross-check and by timing), and running a session on tensors."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["session", "run_session", "OPT_LEVELS"]

#: Graph optimization levels the cross-check runs at (optimizers have had numerical bugs).
OPT_LEVELS = {"disabled": "ORT_DISABLE_ALL", "all": "ORT_ENABLE_ALL"}


def session(
    path: str | Path,
    *,
    optimization: str = "all",
    threads: int | None = None,
    providers: Sequence[str] = ("CPUExecutionProvider",),
) -> Any:
    """An ``onnxruntime.InferenceSession``. ``threads`` pins the intra-op threads and turns thread spinning off
    (for timing: an idle session then cannot steal the busy one's cores); None keeps onnxruntime's defaults."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, OPT_LEVELS[optimization])
    opts.log_severity_level = 3
    if threads is not None:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), sess_options=opts, providers=list(providers))


def run_session(sess: Any, inputs: Sequence[torch.Tensor]) -> list[np.ndarray]:
    """Run ``sess`` on tensors (fed in input order); returns its outputs as arrays."""
    feeds = {i.name: t.detach().cpu().numpy() for i, t in zip(sess.get_inputs(), inputs)}
    return sess.run(None, feeds)
