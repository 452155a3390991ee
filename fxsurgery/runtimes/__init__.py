"""The runtimes a rewrite is run, compared and timed on, each named once in :mod:`.registry` with its code in one
module: onnxruntime (:mod:`.ort`), torch eager (:mod:`.eager`), OpenVINO (:mod:`.openvino_cpu`), ExecuTorch with
XNNPACK (:mod:`.xnnpack`), Core ML (:mod:`.coreml`); the op census after a toolchain's conversion (:mod:`.census`),
side-by-side timing (:mod:`.timing`) and the user-facing benchmark (:mod:`.bench`)."""

from __future__ import annotations

__all__: list[str] = []
