"""Rewrite a classifier's Linear head as convolutions and export it for a convolution-first accelerator.

    python scripts/01_head_to_conv_for_accelerator.py [OUT_DIR]

Builds a small VGG-style classifier (random weights), rewrites its flatten + Linear chain into Conv2d layers, proves
the rewrite exact in float64, exports both versions to ONNX, cross-checks them in onnxruntime, and saves the
rewritten weights in safetensors.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

import fxsurgery


class VGGish(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(7),
        )  # fmt: skip
        self.classifier = nn.Sequential(
            nn.Linear(32 * 7 * 7, 256), nn.ReLU(inplace=True), nn.Dropout(),
            nn.Linear(256, 256), nn.ReLU(inplace=True), nn.Dropout(),
            nn.Linear(256, num_classes),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


def main(out_dir: Path) -> int:
    torch.manual_seed(0)
    model = VGGish().eval()
    x = torch.randn(4, 3, 28, 28)

    # 1. Prove the rewrite exact: float64, example inputs plus random ones and another batch size.
    proof = fxsurgery.linear_to_conv(model, x, precision="float64")
    print(proof.summary())

    # 2. The deployment check: rewrite in float32, export both, cross-check four ways in onnxruntime.
    report = fxsurgery.check(model, x, to="conv", out_dir=out_dir)
    print(report.onnx.summary())
    ops = report.onnx.op_counts["rewritten"]
    print(f"rewritten graph: {ops.get('Conv', 0)} Conv, {ops.get('Gemm', 0) + ops.get('MatMul', 0)} Gemm/MatMul")

    # 3. Weights for the deployment runtime, in the rewritten layout (fc weights are now 4-D conv kernels).
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in report.surgery.module.state_dict().items()}
    save_file(state, str(out_dir / "head_as_conv.safetensors"))
    print(f"wrote {out_dir}/rewritten.onnx and head_as_conv.safetensors")
    return 0 if report.passed else 1


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="fxsurgery-example-"))
    sys.exit(main(target))
