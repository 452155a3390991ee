"""Everything the rules need before they look at a graph.

* :mod:`~fxsurgery.capture.inputs`: :func:`normalize_inputs` and :func:`prepare_model` (unwraps
  ``DataParallel``/``DistributedDataParallel``; rejects ScriptModules, hooks on the root, uninitialised lazy modules).
* :mod:`~fxsurgery.capture.trace`: :func:`trace`, ``torch.fx.symbolic_trace`` with user leaf modules, naming the
  submodule that failed.
* :mod:`~fxsurgery.capture.copies`: :func:`working_copy` (structure copied, parameters viewing the original storage,
  buffers cloned) and :func:`eval_copy`.
* :mod:`~fxsurgery.capture.shapes`: :func:`propagate_shapes` (``node.meta["val"]`` from meta or fake tensors: no real
  activations) and :func:`shape_of`.
* :mod:`~fxsurgery.capture.submodules`: :func:`capture_submodule_inputs`.
* :mod:`~fxsurgery.capture.export`: the ``torch.export`` front end, :func:`export_model` and
  :func:`raise_program` (the ATen graph back to module calls and torch-level ops).
"""

from __future__ import annotations

from fxsurgery.capture.copies import HOOK_DICTS, eval_copy, hooked_containers, keep_attributes, working_copy
from fxsurgery.capture.export import export_model, inert_hook, raise_program
from fxsurgery.capture.guards import batch_is_dynamic, lowest_batch
from fxsurgery.capture.inputs import (
    check_devices,
    check_names,
    keyword_call,
    normalize_inputs,
    on_meta,
    prepare_model,
    refuse_meta,
    split_keywords,
    unwrap,
)
from fxsurgery.capture.shapes import propagate_shapes, shape_of
from fxsurgery.capture.submodules import capture_submodule_inputs
from fxsurgery.capture.trace import trace

__all__ = [
    "capture_submodule_inputs",
    "keyword_call",
    "split_keywords",
    "eval_copy",
    "working_copy",
    "keep_attributes",
    "hooked_containers",
    "HOOK_DICTS",
    "normalize_inputs",
    "prepare_model",
    "unwrap",
    "check_devices",
    "check_names",
    "propagate_shapes",
    "shape_of",
    "trace",
    "on_meta",
    "refuse_meta",
    "export_model",
    "raise_program",
    "batch_is_dynamic",
    "inert_hook",
    "lowest_batch",
]
