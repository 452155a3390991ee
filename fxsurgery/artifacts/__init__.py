"""What a run leaves behind: ONNX files (:mod:`.onnx_export`), checkpoints across a rewrite
(:mod:`.checkpoint`, :mod:`.convert`), ``report.html`` (:mod:`.report_html`), and folders written in full or not at
all (:mod:`._staging`)."""

from __future__ import annotations

__all__ = ["ARTIFACTS"]

#: What :func:`~fxsurgery.artifacts.checkpoint.save_rewritten` can write (the CLI's ``--artifacts``; ``onnx`` is the
#: cross-check's two files).
ARTIFACTS = ("onnx", "pt2", "safetensors", "code")
