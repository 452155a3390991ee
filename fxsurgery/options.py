"""The options of every pass, resolved and checked in one place: :class:`Options`.

The public functions take them as keywords (``linear_to_conv(model, x, token_layout=True)``) or as one object
(``linear_to_conv(model, x, options=Options(token_layout=True))``); both end here, so each option is named, typed,
defaulted and documented once.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any, Literal

from torch import nn

from fxsurgery.artifacts.onnx_export import EXPORTERS
from fxsurgery.errors import InputError
from fxsurgery.plan.targets import TARGETS, check_target
from fxsurgery.runtimes.registry import named

if TYPE_CHECKING:
    from fxsurgery.engine.rule import RuleSet

__all__ = ["Options", "Precision", "LeafSpec", "resolve", "OPTIONS_DOC", "BATCH_LAYOUTS", "FRONTENDS"]

Precision = Literal["native", "float64"]
LeafSpec = Sequence["type[nn.Module] | str"]
BATCH_LAYOUTS = ("spatial", "batch")
FRONTENDS = ("auto", "fx", "export")


@dataclass(frozen=True)
class Options:
    """Trace, rule and validation options of one pass (see :data:`OPTIONS_DOC`)."""

    # tracing
    frontend: str = "auto"
    leaf_modules: tuple[type[nn.Module] | str, ...] = ()
    exclude: tuple[str, ...] = ()
    # rules (Linear -> conv)
    target: str | None = None
    batch_layout: str = ""  # "": the target's, else "spatial"
    token_layout: bool = False
    quantize: Any = field(default=None, compare=False)  # None, "int8" or a PT2E quantizer
    rules: RuleSet | None = field(default=None, compare=False)
    # validation
    validate: bool = True
    precision: Precision = "native"
    rtol: float | None = None
    num_random: int = 2
    seed: int = 0
    # to="auto"
    runtime: str = "onnxruntime"
    # the ONNX cross-check (check, cross_check)
    exporter: str = "dynamo"
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    opset: int | None = None
    dynamic_batch: bool = True
    dynamic_sequence: bool = False
    runtimes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("leaf_modules", "exclude", "providers", "runtimes"):
            value = getattr(self, name)
            if isinstance(value, str):
                raise InputError(
                    f"{name} must be a sequence of names, got the string {value!r}; write {name}=[{value!r}]"
                )
            object.__setattr__(self, name, tuple(value))
        for leaf in self.leaf_modules:
            if not isinstance(leaf, (str, type)):
                raise InputError(f"leaf_modules entries must be module types or qualified names, got {leaf!r}")
        if self.frontend not in FRONTENDS:
            raise InputError(f"frontend must be one of {FRONTENDS}, got {self.frontend!r}")
        check_target(self.target)
        if not self.batch_layout:
            object.__setattr__(
                self, "batch_layout", (TARGETS[self.target].batch_layout if self.target else None) or "spatial"
            )
        if self.batch_layout not in BATCH_LAYOUTS:
            raise InputError(f"batch_layout must be one of {sorted(BATCH_LAYOUTS)}, got {self.batch_layout!r}")
        if not (self.quantize is None or self.quantize == "int8" or callable(getattr(self.quantize, "annotate", None))):
            raise InputError(
                f"quantize must be None, 'int8' or a PT2E quantizer (an object with .annotate), got {self.quantize!r}"
            )
        if not isinstance(self.token_layout, bool):
            raise InputError(f"token_layout must be True or False, got {self.token_layout!r}")
        if self.precision not in ("native", "float64"):
            raise InputError(f"precision must be 'native' or 'float64', got {self.precision!r}")
        if self.runtime not in named("time"):
            raise InputError(f"runtime must be one of {named('time')}, got {self.runtime!r}")
        self._check_cross_check()

    def _check_cross_check(self) -> None:
        if self.exporter not in EXPORTERS:
            raise InputError(f"unknown exporter {self.exporter!r}; use one of {', '.join(EXPORTERS)}")
        if self.opset is not None and (isinstance(self.opset, bool) or not isinstance(self.opset, int)):
            raise InputError(f"opset must be an int (or None: the exporter's), got {self.opset!r}")
        for flag in ("dynamic_batch", "dynamic_sequence"):
            if not isinstance(getattr(self, flag), bool):
                raise InputError(f"{flag} must be True or False, got {getattr(self, flag)!r}")
        for rt in self.runtimes:
            if rt not in named("run"):
                raise InputError(f"unknown cross-check runtime {rt!r}: use one of {', '.join(named('run'))}")

    def without_validation(self) -> Options:
        return replace(self, validate=False)


OPTIONS_DOC = """
Options (keywords, or one ``options=fxsurgery.Options(...)``):

* ``validate=True``: compare the rewritten model with the original numerically; raise
  :class:`~fxsurgery.ValidationError` naming the responsible site(s) on a mismatch.
* ``frontend="auto"``: how the model becomes a graph. ``"fx"``: ``torch.fx.symbolic_trace`` (where it fails inside
  a submodule, that submodule is rewritten on its own). ``"export"``: ``torch.export`` (non-strict, dynamic batch),
  its ATen graph raised back to module calls, so HuggingFace models trace whole. ``"auto"``: fx, and where fx
  cannot trace the whole model, ``torch.export`` too, keeping the one that rewrites more sites (the report says
  which ran and why).
* ``leaf_modules=()``: module types or qualified names torch.fx must not trace into.
* ``exclude=()``: site names to leave alone (listed as skipped, "excluded by the caller").
* ``precision="native"``: validate in the model's dtype; ``"float64"`` runs both models in float64 to prove the
  rewrite exact (~1e-16 of the output scale).
* ``rtol=None``: override the per-dtype tolerance (``fxsurgery.RTOL``), relative to the output's magnitude.
* ``num_random=2``: fresh random inputs validated besides the example inputs (and another batch size).
* ``seed=0``: seed of those random inputs.
* ``target=None``: the deployment target, ``"onnxruntime"``, ``"openvino"``, ``"coreml"`` or
  ``"executorch-xnnpack"``: picks ``batch_layout`` (``"batch"`` for Core ML) and leaves alone the patterns the
  target runs badly (``conv1x1-strided`` for XNNPACK), each choice in the result's notes; ``check`` adds the op
  census after the target's own conversion where its toolchain is installed (:mod:`fxsurgery.plan.targets`).
* ``batch_layout`` (Linear -> conv; the target's, else ``"spatial"``): carry a rewritten head as ``(1, C, 1, N)``,
  the batch side by side on the width axis, so each conv is one matrix product; ``"batch"`` keeps ``(N, C, 1, 1)``
  (N small products). Dense MoE experts read their tokens the same way: ``(1, C, 1, T)`` or ``(T, C, 1, 1)``.
* ``token_layout=False`` (Linear -> conv, opt-in): also carry transformer activations in conv layouts, tokens
  ``(B, S, C)`` as ``(B, C, 1, S)`` (ViT, MLP-Mixer, ``nn.MultiheadAttention`` self-attention) and channels-last
  ``(N, H, W, C)`` maps as NCHW (Swin), from the LayerNorm that starts a block, so every Linear in the block
  becomes a 1x1 conv.
* ``quantize=None``: the rewritten model will be quantized: ``"int8"`` (PT2E with XNNPACKQuantizer, symmetric
  per-channel; onnxruntime's static QDQ, per-channel, for the ONNX files) or a PT2E quantizer object. The rewrite
  emits the forms quantizers keep whole (a LayerNorm carried over channels as one ``layer_norm`` between permutes,
  not 9 reductions each quantized; per-head attention as SDPA itself on permuted views, eager attention as MatMuls,
  not Einsums); ``check`` quantizes both versions with that recipe and compares them
  (:mod:`fxsurgery.verify.quantized`).
* ``rules=None``: a :class:`~fxsurgery.RuleSet` to use instead of the direction's own.
* ``runtime="onnxruntime"`` (``to="auto"`` only): where to measure, ``"onnxruntime"``, ``"torch"`` or
  ``"openvino"`` (its CPU plugin in float32; ``pip install "fxsurgery[openvino]"``).

The ONNX cross-check (``check``, ``cross_check``):

* ``exporter="dynamo"``: the torch.onnx exporter, ``"dynamo"`` or ``"torchscript"``.
* ``providers=("CPUExecutionProvider",)``: onnxruntime's execution providers.
* ``opset=None``: the ONNX opset (None: the exporter's).
* ``dynamic_batch=True``: the batch axis dynamic in the graph the export front end captures and in the ONNX files
  (compared at a second batch size); False: the example's batch, fixed in both (a quicker capture: torch.export
  reasons about no symbolic batch; for the fixed batch an NPU deployment runs at).
* ``dynamic_sequence=False``: True: also the sequence axis (dim 1 of integer ``(batch, sequence)`` inputs), traced
  dynamic by the export front end and exported dynamic where both files keep it (the HuggingFace front door of the
  command line sets it; decoders then carry their rotary tables with a transpose).
* ``runtimes=()``: also cross-check on these runtimes, ``"openvino"`` and/or ``"executorch"`` (their extras).
"""


def resolve(options: Options | None, overrides: Mapping[str, Any]) -> Options:
    """``options`` (default ``Options()``) with the keyword ``overrides`` applied; an unknown keyword is an
    :class:`~fxsurgery.InputError` that names the nearest option."""
    if options is not None and not isinstance(options, Options):
        raise InputError(f"options must be an fxsurgery.Options, got {type(options).__name__}")
    known = [f.name for f in fields(Options)]
    for key in overrides:
        if key not in known:
            near = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else f"; options are {', '.join(known)}"
            raise InputError(f"unknown option {key!r}{hint}")
    if overrides.get("target") is not None and "batch_layout" not in overrides:
        overrides = {**overrides, "batch_layout": ""}  # the target's own, not the one already resolved
    return replace(options or Options(), **overrides)
