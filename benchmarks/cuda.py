"""What the rewrite costs or saves on a CUDA GPU, eager PyTorch: ``python -m benchmarks.cuda [--out PATH] [--quick]``.

Each case builds a model on the device (random weights), rewrites it there (validation on, native precision; the
rewrite's own wall time is reported), then times the original and the rewritten model in alternating pairs
(``../shared/BENCHMARKING.md``; ``fxsurgery.runtimes.timing``: eager copies, each call waited for on the GPU, enough
calls to fill ~50 ms per sample), the ratio rewritten / original of each
pair, the median with the lowest and highest; the original against itself, timed the same way, is the noise floor.
Writes a Markdown table (``benchmarks/cuda.md``). Without a CUDA device it runs on the CPU (``--quick``: small shapes,
the smoke test's run); the figures in ``benchmarks/cuda.md`` come from a GPU.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch

from fxsurgery.errors import one_line
from fxsurgery.runtimes.timing import Ratio, interleaved, runner
from fxsurgery.verify.policy import float32_products

PAIRS = 9
#: Calls repeated within each timed sample to fill at least this long.
SAMPLE_S = 0.05


def _resnet(device: torch.device, quick: bool) -> tuple[torch.nn.Module, tuple[Any, ...]]:
    import torchvision

    model = (torchvision.models.resnet18 if quick else torchvision.models.resnet50)(weights=None)
    size, batch = (64, 2) if quick else (224, 32)
    return model.to(device).eval(), (torch.randn(batch, 3, size, size, device=device),)


def _vit(device: torch.device, quick: bool) -> tuple[torch.nn.Module, tuple[Any, ...]]:
    import torchvision

    if quick:
        model = torchvision.models.VisionTransformer(32, 8, 2, 4, 32, 64, num_classes=10)
        size, batch = 32, 2
    else:
        model, size, batch = torchvision.models.vit_b_16(weights=None), 224, 32
    torch.nn.init.normal_(model.heads.head.weight, std=0.02)  # (torchvision's head starts at zero: nothing to compare)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return model.to(device, dtype).eval(), (torch.randn(batch, 3, size, size, device=device, dtype=dtype),)


def _llama(device: torch.device, quick: bool) -> tuple[torch.nn.Module, tuple[Any, ...]]:
    import transformers

    names = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")
    shape = dict(zip(names, (32, 64, 2, 4, 2) if quick else (2048, 8192, 16, 32, 8)))  # Llama-3.2-1B's (vocab 32000)
    config = transformers.LlamaConfig(vocab_size=32000, max_position_embeddings=4096, use_cache=False, **shape)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    with device:
        model = transformers.LlamaForCausalLM(config).to(dtype).eval()
    length = 16 if quick else 1024
    return model, (torch.randint(0, 32000, (1, length), device=device),)


#: name, what is rewritten and how, the model's builder, the rewrite's direction and options, how float32 products
#: run while timed: torch's defaults (cuDNN convolutions in TF32, cuBLAS matrix products not), all in TF32, or none
CASES: tuple[tuple[str, str, Callable[..., Any], str, dict[str, Any], str], ...] = (
    ("ResNet-50, batch 32, 224x224, float32", "1x1 convs -> Linear", _resnet, "linear", {}, "defaults"),
    ("ResNet-50, batch 32, 224x224, float32", "1x1 convs -> Linear", _resnet, "linear", {}, "tf32"),
    ("ResNet-50, batch 32, 224x224, float32", "1x1 convs -> Linear", _resnet, "linear", {}, "ieee"),
    ("ViT-B/16, batch 32, bfloat16", "token layout", _vit, "conv", {"token_layout": True}, "defaults"),
    (
        "Llama-3.2-1B shapes, prefill of 1024, bfloat16",
        "token layout",
        _llama,
        "conv",
        {"token_layout": True},
        "defaults",
    ),
)
_BUILT: dict[str, Any] = {}
_FP32 = {"defaults": "torch's defaults", "tf32": "TF32 everywhere", "ieee": "full float32"}


def _fp32(setting: str) -> AbstractContextManager[None]:
    """Float32 convolutions and matrix products as ``setting`` says while timing (``"defaults"``: as they are)."""
    if setting == "defaults":
        return nullcontext()
    return float32_products(setting, (torch.backends.cudnn.conv, torch.backends.cuda.matmul))


def _spread(ratio: Ratio) -> str:
    return f"**{ratio.median:.2f}** ({ratio.low:.2f}..{ratio.high:.2f})"


def row(
    case: tuple[str, str, Callable[..., Any], str, dict[str, Any], str], device: torch.device, quick: bool, pairs: int
):
    import fxsurgery

    name, what, build, to, options, fp32 = case
    if name not in _BUILT:  # one rewrite per model, timed under each float32 setting
        _BUILT.clear()
        model, inputs = build(device, quick)
        start = time.perf_counter()
        res = fxsurgery.rewrite(model, inputs, to, **options)
        _BUILT[name] = (model, inputs, res, time.perf_counter() - start)
    model, inputs, res, seconds = _BUILT[name]
    with _fp32(fp32), tempfile.TemporaryDirectory() as work:  # (eager timing writes nothing there)
        original, again, rewritten = (  # (two copies of the original: interleaved times each callable apart)
            runner(m, inputs, "torch", Path(work), torch.get_num_threads()) for m in (model, model, res.module)
        )
        ratio = interleaved(original, rewritten, pairs, min_sample_s=SAMPLE_S)
        noise = interleaved(original, again, pairs, min_sample_s=SAMPLE_S)
    sites = f"{len(res.rewritten)}/{len(res.sites)}"
    passed = f"passed ({res.validation.max_rel_error:.1e})" if res.validation.passed else "FAILED"
    return (
        f"| {name} | {what} | {_FP32[fp32]} | {sites} | {passed} | {seconds:.1f} | {ratio.a_ms:.2f} "
        f"| {_spread(ratio)} | {_spread(noise)} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/cuda.md")
    parser.add_argument("--quick", action="store_true", help="small shapes (the smoke test)")
    parser.add_argument("--pairs", type=int, default=PAIRS)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({platform.machine()})"
    tf32 = (
        f"torch's defaults for float32: cuDNN convolutions `{torch.backends.cudnn.conv.fp32_precision}`, cuBLAS "
        f"matrix products `{torch.backends.cuda.matmul.fp32_precision}`"
        if device.type == "cuda"
        else f"{torch.get_num_threads()} threads"
    )
    command = "python -m benchmarks.cuda" + (" --quick" if args.quick else "")
    lines = [
        "# On a CUDA GPU: the rewritten model against the original, eager PyTorch",
        "",
        f"Generated by `{command}` on {where}, torch {torch.__version__}; {tf32}. Each model is built on the "
        "device with random weights and rewritten there (validation on the device, native precision; *rewrite s*: "
        "the tool's wall time). *Rewritten / original*: the time per call of the rewritten model over the "
        f"original's, {args.pairs} pairs in alternating order (eager copies, each call waited for on the GPU, enough "
        "calls to fill ~50 ms per sample), "
        "median (lowest..highest); below 1 the rewrite is faster. *Noise floor*: the original against itself, "
        "timed the same way. *float32 products*: how float32 convolutions and matrix products ran while timed "
        "(torch's defaults round cuDNN's convolutions to TF32 and not cuBLAS's products: a Linear and its conv then "
        "run at two precisions; validation compares them in full float32).",
        "",
        "| model | rewrite | float32 products | sites rewritten | validation (max error / scale) | rewrite s | "
        "original ms | rewritten / original | noise floor |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for case in CASES:
        try:
            lines.append(row(case, device, args.quick, args.pairs))
        except Exception as e:  # one case's failure is a row of the table, not the end of the run
            lines.append(f"| {case[0]} | {case[1]} | {_FP32[case[5]]} | {type(e).__name__}: {one_line(e)[:300]} |")
        print(lines[-1], flush=True)
        torch.cuda.empty_cache() if device.type == "cuda" else None
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
