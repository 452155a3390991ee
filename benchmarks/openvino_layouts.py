"""Which batch layout suits OpenVINO (``fxsurgery.plan.targets``): Linear -> conv with ``batch_layout="spatial"`` and
``"batch"``, each timed against the original on OpenVINO's CPU plugin (f32, 2 threads) at batch 1, interleaved
pairs, with the original against itself as the noise floor; and the op census of each (OpenVINO's execution graph).

Run (needs ``pip install "fxsurgery[openvino]"`` and torchvision): ``python -m benchmarks.openvino_layouts``.
Measured (OpenVINO 2026.4, 2 cores): ResNet-18 spatial 0.97 (0.96..0.98), batch 1.00 (1.00..1.04), noise 1.01
(0.96..1.12); VGG-11 spatial 1.00 (0.99..1.01), batch 1.01 (0.98..1.04), noise 1.00 (0.99..1.02): no layout wins,
so the ``openvino`` target keeps the default, though ``"batch"`` leaves 2 fewer Transposes and Reorders.
"""

from __future__ import annotations

import warnings

import torch

import fxsurgery
from fxsurgery.runtimes.census import census
from fxsurgery.runtimes.timing import interleaved


def main(pairs: int = 7) -> None:
    import openvino as ov
    import torchvision

    warnings.simplefilter("ignore")
    core = ov.Core()

    def runner(model: torch.nn.Module, x: torch.Tensor):  # type: ignore[no-untyped-def]
        compiled = core.compile_model(ov.convert_model(model.eval(), example_input=x), "CPU",
                                      {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": 2})  # fmt: skip
        request, feed = compiled.create_infer_request(), x.numpy()
        return lambda: request.infer([feed])

    for name in ("resnet18", "vgg11"):
        torch.manual_seed(0)
        model, x = torchvision.models.get_model(name, weights=None).eval(), torch.randn(1, 3, 224, 224)
        base = runner(model, x)
        for layout in ("spatial", "batch"):
            form = fxsurgery.linear_to_conv(model, x, validate=False, batch_layout=layout).module
            r = interleaved(base, runner(form, x), pairs)
            print(f"{name} {layout:8s} rewritten/original {r.text()}  {census('openvino', model, form, (x,))['rewritten']}")
        print(f"{name} noise    {interleaved(base, runner(model, x), pairs).text()}")


if __name__ == "__main__":
    main()
