"""What the rewrite costs or saves on a CUDA GPU, eager PyTorch: ``python -m benchmarks.cuda [--out PATH] [--quick]``.

Each case builds a model on the device (random weights), rewrites it there (validation on, native precision; the
rewrite's own wall time is reported), then times the original and the rewritten model in alternating pairs
(``../shared/BENCHMARKING.md``): CUDA events around enough calls to fill ~50 ms, the ratio rewritten / original of each
pair, the median with the lowest and highest; the original against itself, timed the same way, is the noise floor.
Writes a Markdown table (``benchmarks/cuda.md``). Without a CUDA device it runs on the CPU (``--quick``: small shapes,
the smoke test's run); the figures in ``benchmarks/cuda.md`` come from a GPU.
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from fxsurgery.errors import one_line

PAIRS = 9


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


@contextmanager
def _fp32(setting: str) -> Iterator[None]:
    """Float32 products as ``setting`` says while timing (``"defaults"``: as the process has them)."""
    backends = (torch.backends.cudnn.conv, torch.backends.cuda.matmul)
    saved = [b.fp32_precision for b in backends]
    try:
        for b in backends if setting != "defaults" else ():
            b.fp32_precision = setting
        yield
    finally:
        for b, value in zip(backends, saved):
            b.fp32_precision = value


def _seconds(fn: Callable[[], Any], device: torch.device, calls: int) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3 / calls
    start_s = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start_s) / calls


def _ratios(a: Callable[[], Any], b: Callable[[], Any], device: torch.device, pairs: int) -> tuple[list[float], float]:
    """b's time over a's, pair by pair in alternating order, and a's median time per call."""
    for fn in (a, b, a, b):  # warm-up: allocation, kernel selection
        fn()
    once = _seconds(a, device, 1)
    calls = max(3, math.ceil(0.05 / max(once, 1e-6)))
    ratios, times = [], []
    for i in range(pairs):
        first, second = (a, b) if i % 2 == 0 else (b, a)
        t1, t2 = _seconds(first, device, calls), _seconds(second, device, calls)
        ta, tb = (t1, t2) if i % 2 == 0 else (t2, t1)
        ratios.append(tb / ta)
        times.append(ta)
    return ratios, statistics.median(times)


def _spread(ratios: list[float]) -> str:
    return f"**{statistics.median(ratios):.2f}** ({min(ratios):.2f}..{max(ratios):.2f})"


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
    with torch.no_grad(), _fp32(fp32):
        original, rewritten = (lambda: model(*inputs)), (lambda: res.module(*inputs))
        ratios, base = _ratios(original, rewritten, device, pairs)
        noise, _ = _ratios(original, original, device, pairs)
    sites = f"{len(res.rewritten)}/{len(res.sites)}"
    passed = f"passed ({res.validation.max_rel_error:.1e})" if res.validation.passed else "FAILED"
    return (
        f"| {name} | {what} | {_FP32[fp32]} | {sites} | {passed} | {seconds:.1f} | {base * 1e3:.2f} "
        f"| {_spread(ratios)} | {_spread(noise)} |"
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
        f"original's, {args.pairs} pairs in alternating order (CUDA events around enough calls to fill ~50 ms), "
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
