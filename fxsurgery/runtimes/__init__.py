"""The runtimes a rewrite is run, compared and timed on: onnxruntime (:mod:`.ort`), OpenVINO and ExecuTorch
(:mod:`.runners`), Core ML (:mod:`.coreml`), the op census after a toolchain's conversion (:mod:`.census`), side-by-side
timing (:mod:`.timing`) and the user-facing benchmark (:mod:`.bench`)."""

from __future__ import annotations

__all__: list[str] = []
