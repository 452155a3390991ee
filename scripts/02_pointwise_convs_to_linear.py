"""Turn the pointwise (1x1) convolutions of a Network-in-Network model into Linear layers for a matmul runtime.

    python scripts/02_pointwise_convs_to_linear.py [OUT_DIR]

Shows the layout sharing (one permute in, one out for a run of pointwise convs), the checkpoint round trip
(an original-format checkpoint loads into the rewritten model, bit-identically), and the ONNX cross-check.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

import fxsurgery
from fxsurgery.models import NetworkInNetwork


def main(out_dir: Path) -> int:
    torch.manual_seed(0)
    model = NetworkInNetwork(64).eval()
    x = torch.randn(2, 3, 32, 32)

    result = fxsurgery.conv_to_linear(model, x)
    print(result.summary())
    permutes = sum(n.target == "permute" for n in result.module.graph.nodes)
    print(f"layout changes in the rewritten graph: {permutes}")

    # A checkpoint trained on the original loads into the rewritten model, and comes back bit-identical.
    checkpoint = {k: v.clone() for k, v in model.state_dict().items()}
    fxsurgery.load_state_dict(result.module, checkpoint)
    back = fxsurgery.original_state_dict(result.module)
    identical = all(torch.equal(back[k], checkpoint[k]) for k in checkpoint)
    print(f"checkpoint round trip bit-identical: {identical}")

    chk = fxsurgery.cross_check(model, result.module, x, out_dir, direction=result.direction,
                                rewritten_sites=len(result.rewritten))  # fmt: skip
    print(chk.summary())
    return 0 if (chk.passed and identical) else 1


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="fxsurgery-example-"))
    sys.exit(main(target))
