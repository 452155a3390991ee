"""onnxruntime: the one session factory (used by the cross-check and by timing), running a session on tensors, and
the runtime's :class:`~fxsurgery.runtimes.registry.Backend` (timing, op census)."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fxsurgery.artifacts.onnx_export import export_onnx, op_histogram
from fxsurgery.runtimes.registry import Backend

__all__ = ["session", "run_session", "OPT_LEVELS", "OnnxRuntime"]

log = logging.getLogger(__name__)

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


class OnnxRuntime(Backend):
    """onnxruntime on the CPU: timed from an ONNX export, and the graph it runs after its own optimizations."""

    def timer(self, module: nn.Module, inputs: tuple[Any, ...], workdir: Path, threads: int, exporter: str) -> Callable:
        """Exported into ``workdir`` with ``exporter`` (a model the TorchScript exporter cannot export is exported with
        dynamo) and run in a session with ``threads`` pinned intra-op threads and no thread spinning."""
        path = workdir / f"m{len(list(workdir.iterdir()))}.onnx"
        try:
            export_onnx(module, inputs, path, exporter=exporter, dynamic_batch=False)
        except Exception:
            if exporter == "dynamo":
                raise
            log.info(
                "the %s exporter failed on %s: exported with dynamo", exporter, type(module).__name__, exc_info=True
            )
            export_onnx(module, inputs, path, dynamic_batch=False)
        sess = session(path, threads=threads)
        feed = {i.name: t.numpy() for i, t in zip(sess.get_inputs(), inputs)}
        return lambda: sess.run(None, feed)

    def census(
        self, module: nn.Module, inputs: tuple[Any, ...], onnx_path: str | None, save: Path | None = None
    ) -> dict[str, int]:
        """The op histogram of the graph onnxruntime runs after its own optimizations (extended level, saved); the
        file onnxruntime deploys is the ONNX file itself (``save`` is not used)."""
        import onnxruntime as ort

        with tempfile.TemporaryDirectory(prefix="fxsurgery-census-") as tmp:
            if onnx_path is None:
                onnx_path = f"{tmp}/model.onnx"
                export_onnx(module, inputs, Path(onnx_path), dynamic_batch=False)  # the example batch
            so = ort.SessionOptions()
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
            so.optimized_model_filepath = f"{tmp}/optimized.onnx"
            ort.InferenceSession(onnx_path, so, providers=["CPUExecutionProvider"])
            return op_histogram(so.optimized_model_filepath)
