"""Benchmark harness: what a rewrite costs, and whether rewritten graphs run as fast as the originals.

    python -m benchmarks                      # every suite; writes benchmarks/results.{json,md,png}
    python -m benchmarks latency --pairs 5    # one suite
    python -m benchmarks --quick              # tiny models, one pair: a smoke run

Method (../shared/BENCHMARKING.md): ratios measured side by side in one run. Original (A) and rewritten (B) alternate
(A B, B A, A B, ...); each pair gives a ratio B/A; the median ratio and its spread (min..max) are reported, with the
noise floor: the original against itself, measured the same way. Threads are pinned (torch and onnxruntime, 2 by
default) and printed; onnxruntime sessions have thread spinning off so the idle session cannot steal cores; both
sides are warmed up before the first pair. Peak memory is read in a fresh subprocess per measurement. No figure is
compared with one from another run.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import fxsurgery
from benchmarks import llm
from fxsurgery.artifacts.onnx_export import export_onnx
from fxsurgery.plan.auto import TIMING_EXPORTER
from fxsurgery.runtimes.timing import Ratio, interleaved, runner

HERE = Path(__file__).resolve().parent
SUITES = ("cost", "memory", "check", "latency", "kernels", "auto", "meta", "convert")


# -- cases ------------------------------------------------------------------------------------------------------------


class ResNet50Head(nn.Module):
    """2048x7x7 -> average pool -> flatten -> Linear(2048, 1000)."""

    def __init__(self) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2048, 1000)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.avgpool(x), 1))


class VGGClassifier(nn.Module):
    """512x7x7 -> flatten -> 4096 -> 4096 -> 1000, as in torchvision's VGG."""

    def __init__(self) -> None:
        super().__init__()
        self.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, 4096), nn.ReLU(True), nn.Dropout(),
            nn.Linear(4096, 4096), nn.ReLU(True), nn.Dropout(), nn.Linear(4096, 1000),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(x, 1))


class PointwiseStack(nn.Module):
    """A Network-in-Network-style stack of 256-channel pointwise convs."""

    def __init__(self, channels: int = 256, depth: int = 4) -> None:
        super().__init__()
        self.body = nn.Sequential(*[m for _ in range(depth) for m in (nn.Conv2d(channels, channels, 1), nn.ReLU())])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def torchvision_model(name: str) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        import torchvision

        return torchvision.models.get_model(name, weights=None)

    return make


@dataclass(frozen=True)
class Case:
    name: str
    make: Callable[[], nn.Module]
    shape: tuple[int, ...]
    to: str
    options: tuple[tuple[str, Any], ...] = ()  # rewrite options, e.g. (("token_layout", True),)

    @property
    def key(self) -> str:
        return f"{self.name}@{self.shape[0]}"


def latency_cases(quick: bool) -> list[Case]:
    if quick:
        return [Case("tiny head", lambda: nn.Sequential(nn.Flatten(), nn.Linear(32, 8)), (4, 8, 2, 2), "conv"),
                Case("tiny pointwise", lambda: PointwiseStack(8, 2), (2, 8, 4, 4), "linear")]  # fmt: skip
    cases = [
        Case("resnet50 head", ResNet50Head, (64, 2048, 7, 7), "conv"),
        Case("vgg classifier", VGGClassifier, (32, 512, 7, 7), "conv"),
        Case("nin pointwise 256", PointwiseStack, (8, 256, 28, 28), "linear"),
    ]
    for name in ("resnet50", "vgg16", "mobilenet_v3_large"):
        for batch in (1, 32):
            cases.append(Case(f"{name}", torchvision_model(name), (batch, 3, 224, 224), "conv"))
    for name in ("resnet50", "mobilenet_v3_large"):
        cases.append(Case(f"{name}", torchvision_model(name), (1, 3, 224, 224), "linear"))
    return cases + transformer_cases()


TOKENS = (("token_layout", True),)


def transformer_cases() -> list[Case]:
    """Issue 7: transformer and channels-last models before/after, batch 1 and 8 (ViT, Swin and MaxViT under the
    opt-in token layout; ConvNeXt's blocks need none)."""
    cases = []
    for name, options in (("convnext_tiny", ()), ("swin_t", TOKENS), ("vit_b_16", TOKENS), ("maxvit_t", TOKENS)):
        for batch in (1, 8):
            label = f"{name}{' (tokens)' if options else ''}"
            cases.append(Case(label, torchvision_model(name), (batch, 3, 224, 224), "conv", options))
    return cases


# -- suites -----------------------------------------------------------------------------------------------------------


@dataclass
class LatencyRow:
    case: str
    direction: str
    batch: int
    runtime: str
    ratio: Ratio
    noise: Ratio
    rewritten_sites: int
    extra: dict[str, Any] = field(default_factory=dict)


def latency(cases: list[Case], pairs: int, threads: int, runtimes: tuple[str, ...]) -> list[LatencyRow]:
    rows: list[LatencyRow] = []
    for case in cases:
        rows += _latency_case(case, pairs, threads, runtimes)
        gc.collect()
    return rows


def _latency_case(case: Case, pairs: int, threads: int, runtimes: tuple[str, ...]) -> list[LatencyRow]:
    """One case through :func:`fxsurgery.benchmark`, the API users time their own models with."""
    torch.manual_seed(0)
    model = case.make().eval()
    x = torch.randn(case.shape)
    report = fxsurgery.benchmark(model, x, case.to, runtimes=[r for r in ("torch", "onnxruntime") if r in runtimes],
                                 pairs=pairs, threads=threads, validate=False, **dict(case.options))  # fmt: skip
    rows = []
    for r in report.rows:
        rows.append(LatencyRow(case.name, report.direction, r.batch, "torch eager" if r.runtime == "torch" else
                               r.runtime, r.ratio, r.noise, report.rewritten_sites))  # fmt: skip
        _report(rows[-1])
    return rows


class _Linear2d(nn.Module):
    """A Linear on ``(N, C)``: the original form of a head, with no layout change around it."""

    def __init__(self, c: int, o: int) -> None:
        super().__init__()
        self.fc = nn.Linear(c, o)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


class _Conv1x1(nn.Module):
    """The same product as a 1x1 Conv2d on input already laid out as ``(1, C, 1, N)`` (no transpose)."""

    def __init__(self, lin: nn.Linear) -> None:
        super().__init__()
        self.conv = nn.Conv2d(lin.in_features, lin.out_features, 1)
        self.conv.weight = nn.Parameter(lin.weight.detach().view(*lin.weight.shape, 1, 1))
        self.conv.bias = lin.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class _LinearStack2d(nn.Module):
    """A pointwise-conv stack's Linear form on input already laid out as ``(N*H*W, C)`` (no transpose)."""

    def __init__(self, stack: PointwiseStack) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for m in stack.body:
            if isinstance(m, nn.Conv2d):
                lin = nn.Linear(m.in_channels, m.out_channels)
                lin.weight = nn.Parameter(m.weight.detach().flatten(1))
                lin.bias = m.bias
                m = lin
            layers.append(m)
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def kernels(pairs: int, threads: int, runtimes: tuple[str, ...], quick: bool) -> list[dict[str, Any]]:
    """The product alone in both forms, with the input already in each form's layout: how much of a latency ratio
    is the runtime's kernel rather than the layout changes the rewrite adds around it."""
    torch.manual_seed(0)
    cases: list[tuple[str, nn.Module, torch.Tensor, nn.Module, torch.Tensor]] = []
    for n, c, o in ((4, 8, 8),) if quick else ((64, 2048, 1000), (32, 4096, 4096), (32, 25088, 4096)):
        lin = _Linear2d(c, o).eval()
        x = torch.randn(n, c)
        cases.append((f"Linear({c}->{o}) b{n} as 1x1 conv on (1,C,1,N)", lin, x, _Conv1x1(lin.fc).eval(),
                      x.t().reshape(1, c, 1, n).contiguous()))  # fmt: skip
    stack = (PointwiseStack(8, 2) if quick else PointwiseStack()).eval()
    x = torch.randn(2, 8, 4, 4) if quick else torch.randn(8, 256, 28, 28)
    cases.append((f"pointwise conv stack {tuple(x.shape)} as Linear on (N*H*W,C)", stack, x, _LinearStack2d(stack),
                  x.permute(0, 2, 3, 1).reshape(-1, x.shape[1]).contiguous()))  # fmt: skip
    rows = []
    for name, a, xa, b, xb in cases:
        for runtime in ("torch eager", "onnxruntime"):
            if runtime.split()[0] not in runtimes:
                continue
            with tempfile.TemporaryDirectory() as tmp:
                ra, rb = _runner(runtime, xa, threads, Path(tmp))(a), _runner(runtime, xb, threads, Path(tmp))(b)
                r = interleaved(ra, rb, pairs)
            rows.append({"case": name, "runtime": runtime, "ratio": asdict(r)})
            print(f"  kernel {name:55s} {runtime:12s} rewritten form / original form {r.text()} "
                  f"({r.a_ms:.2f} -> {r.b_ms:.2f} ms)", flush=True)  # fmt: skip
    return rows


def auto_cases(quick: bool) -> list[Case]:
    if quick:
        return [Case("tiny pointwise", lambda: PointwiseStack(8, 2), (2, 8, 4, 4), "auto")]
    return [Case(name, torchvision_model(name), (1, 3, 224, 224), "auto")
            for name in ("resnet50", "mobilenet_v3_large")] + [
        Case("vit_b_16 (tokens)", torchvision_model("vit_b_16"), (1, 3, 224, 224), "auto", TOKENS)]  # fmt: skip


def auto(cases: list[Case], pairs: int, threads: int, runtimes: tuple[str, ...]) -> list[dict[str, Any]]:
    """``to="auto"`` per model and runtime, then, measured again side by side, auto / original and all-conv /
    all-linear / original: auto must be at most 1.02x the original and 1.05x the better of all-conv and all-linear."""
    rows = []
    for case in cases:
        torch.manual_seed(0)
        model = case.make().eval()
        x = torch.randn(case.shape)
        options = dict(case.options)
        forms = {"all-conv": fxsurgery.rewrite(model, x, "conv", validate=False, **options).module,
                 "all-linear": fxsurgery.rewrite(model, x, "linear", validate=False).module}  # fmt: skip
        for runtime in runtimes:
            start = time.perf_counter()
            res = fxsurgery.rewrite(model, x, "auto", runtime="torch" if runtime == "torch eager" else runtime,
                                    validate=False, **options)  # fmt: skip
            took = time.perf_counter() - start
            with tempfile.TemporaryDirectory() as tmp:
                run = _runner(runtime, x, threads, Path(tmp))
                base = run(model)
                ratios = {label: interleaved(base, run(m), pairs)
                          for label, m in {"auto": res.module, **forms}.items()}  # fmt: skip
                if runtime == "onnxruntime":  # auto times TorchScript exports: do they run like the dynamo ones?
                    ratios["torchscript-export"] = interleaved(base, runner(model, x, runtime, Path(tmp), threads,
                                                                            exporter=TIMING_EXPORTER), pairs)  # fmt: skip
            best = min(ratios["all-conv"].median, ratios["all-linear"].median)
            row = {"case": case.name, "batch": case.shape[0], "runtime": runtime, "chosen": res.timings["chosen"],
                   "auto_seconds": took, "ratios": {k: asdict(v) for k, v in ratios.items()},
                   "auto_vs_better": ratios["auto"].median / best,
                   "sites_kept": sum(1 for c in res.timings["sites"] if c["chosen"] == "rewritten"),
                   "sites_measured": len(res.timings["sites"])}  # fmt: skip
            rows.append(row)
            print(f"  auto {case.name:20s} b={case.shape[0]:<3d} {runtime:12s} chose {row['chosen']:10s} "
                  f"auto/original {ratios['auto'].text()}  all-conv {ratios['all-conv'].text()}  all-linear "
                  f"{ratios['all-linear'].text()}  auto/better {row['auto_vs_better']:.2f}  ({took:.0f}s to choose)",
                  flush=True)  # fmt: skip
        gc.collect()
    return rows


def _runner(runtime: str, x: torch.Tensor, threads: int, tmp: Path) -> Callable[[nn.Module], Callable[[], Any]]:
    """``run(module)``: a zero-argument callable running ``module`` on ``x`` on ``runtime``."""
    return lambda module: runner(module, x, "torch" if runtime == "torch eager" else runtime, tmp, threads)


def _report(row: LatencyRow) -> None:
    print(f"  {row.case:20s} {row.direction:15s} b={row.batch:<3d} {row.runtime:12s} rewritten/original "
          f"{row.ratio.text()}  noise {row.noise.text()}  ({row.ratio.a_ms:.2f} -> {row.ratio.b_ms:.2f} ms)",
          flush=True)  # fmt: skip


def rewrite_cost(model_name: str, pairs: int) -> dict[str, Any]:
    """linear_to_conv(model, validate=False) against one eager forward at batch 1 and a bare symbolic_trace."""
    torch.manual_seed(0)
    model = _model(model_name)
    x = torch.randn(1, 3, 224, 224) if model_name != "tiny" else torch.randn(1, 8, 2, 2)

    def forward() -> None:
        with torch.no_grad():
            model(x)

    def rewrite() -> None:
        fxsurgery.linear_to_conv(model, x, validate=False)

    vs_forward = interleaved(forward, rewrite, pairs)
    vs_trace = interleaved(lambda: torch.fx.symbolic_trace(model), rewrite, pairs)
    out = {"model": model_name, "vs_forward": asdict(vs_forward), "vs_symbolic_trace": asdict(vs_trace)}
    print(f"  rewrite cost {model_name}: {vs_forward.text()} x one eager forward (batch 1), {vs_trace.text()} x a "
          f"bare symbolic_trace ({vs_forward.b_ms:.0f} ms rewrite, {vs_forward.a_ms:.0f} ms forward)", flush=True)
    return out


SCALE_DEPTHS = (250, 500, 1000, 2000)


def rewrite_scale(pairs: int, depths: tuple[int, ...] = SCALE_DEPTHS) -> list[dict[str, Any]]:
    """``conv_to_linear(validate=False)`` on stacks of 250-2000 pointwise convs (64 channels, 4x4 input) against a
    bare ``symbolic_trace`` of the same stack: the cost per conv must stay flat as the graph grows."""
    rows = []
    for depth in depths:
        torch.manual_seed(0)
        model, x = PointwiseStack(64, depth).eval(), torch.randn(1, 64, 4, 4)
        r = interleaved(lambda: torch.fx.symbolic_trace(model),
                        lambda: fxsurgery.conv_to_linear(model, x, validate=False), pairs)  # fmt: skip
        rows.append({"convs": depth, "vs_symbolic_trace": asdict(r), "ms_per_conv": r.b_ms / depth})
        print(f"  rewrite scale {depth:5d} pointwise convs: {r.b_ms / depth:.2f} ms per conv, {r.text()} x a bare "
              f"symbolic_trace ({r.b_ms:.0f} ms vs {r.a_ms:.0f} ms)", flush=True)  # fmt: skip
        gc.collect()
    return rows


def _model(name: str) -> nn.Module:
    if name == "tiny":
        return nn.Sequential(nn.Flatten(), nn.Linear(32, 8)).eval()
    return torchvision_model(name)().eval()


_MEMORY_CHILD = """
import sys, torch, fxsurgery
sys.path.insert(0, {root!r})
from benchmarks.bench import _model
model = _model({name!r})
x = torch.randn(1, 3, 224, 224) if {name!r} != "tiny" else torch.randn(1, 8, 2, 2)
params = sum(p.numel() * p.element_size() for p in model.parameters())
import gc; gc.collect()
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
def growth():
    gc.collect()
    before = status("VmRSS:")
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
    res = fxsurgery.linear_to_conv(model, x, validate=False)
    return status("VmHWM:") - before
first = growth()  # includes loading torch.fx / fake-tensor code on first use
print(params, growth(), first)
"""


def memory(model_name: str) -> dict[str, Any]:
    """Peak RSS growth during linear_to_conv(validate=False), in a fresh process, against the parameter bytes.

    The peak is reset (``/proc/self/clear_refs``) once the model is built, so the figure is the rewrite's own
    high-water mark above the resident size before it; the first call in the process (which also loads libraries)
    is reported beside the second.
    """
    code = _MEMORY_CHILD.format(root=str(HERE.parent), name=model_name)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    params, growth, first = int(out[-3]), int(out[-2]), int(out[-1])
    result = {"model": model_name, "param_bytes": params, "peak_rss_growth_bytes": growth,
              "fraction_of_params": growth / params, "first_call_growth_bytes": first}  # fmt: skip
    print(f"  memory {model_name}: peak RSS grew {growth / 2**20:.1f} MiB during the rewrite = "
          f"{100 * growth / params:.2f}% of {params / 2**20:.0f} MiB of parameters (first call in the process, "
          f"library loading included: {first / 2**20:.1f} MiB)", flush=True)
    return result


def check_cost(model_name: str) -> dict[str, Any]:
    """fxsurgery.check (rewrite, validate, export both, ORT cross-check) against one bare torch.onnx.export plus
    session creation of the original alone; time of each phase."""
    import onnxruntime as ort

    torch.manual_seed(0)
    model = _model(model_name)
    x = torch.randn(1, 3, 224, 224) if model_name != "tiny" else torch.randn(1, 8, 2, 2)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        export_onnx(model, (x,), Path(tmp) / "bare.onnx")
        ort.InferenceSession(str(Path(tmp) / "bare.onnx"), providers=["CPUExecutionProvider"])
        bare = time.perf_counter() - start
        start = time.perf_counter()
        res = fxsurgery.linear_to_conv(model, x)
        t_rewrite = time.perf_counter() - start
        start = time.perf_counter()
        fxsurgery.cross_check(model, res.module, x, Path(tmp) / "check", direction=res.direction,
                              rewritten_sites=len(res.rewritten))  # fmt: skip
        t_cross = time.perf_counter() - start
    total = t_rewrite + t_cross
    out = {"model": model_name, "bare_export_and_session_s": bare, "rewrite_and_validate_s": t_rewrite,
           "export_both_and_cross_check_s": t_cross, "ratio": total / bare}  # fmt: skip
    print(f"  check cost {model_name}: {total:.1f}s (rewrite+validate {t_rewrite:.1f}s, export both + ORT cross-check "
          f"{t_cross:.1f}s) = {total / bare:.2f}x a bare export + session ({bare:.1f}s)", flush=True)
    return out


# -- output -----------------------------------------------------------------------------------------------------------


def write_outputs(results: dict[str, Any], out: Path, command: str) -> None:
    out.with_suffix(".json").write_text(json.dumps(results, indent=1, default=_json))
    lines = [
        "# Benchmark results",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {results['machine']}. Ratios are rewritten/original (lower is faster), median over interleaved "
        "pairs with the spread in parentheses; the noise floor is the original against itself, measured the same way.",
        "",
    ]
    if results.get("rewrite_cost"):
        lines += ["## Cost of the rewrite", ""]
        for r in results["rewrite_cost"]:
            f, t = r["vs_forward"], r["vs_symbolic_trace"]
            lines.append(f"- `linear_to_conv({r['model']}, validate=False)`: **{f['median']:.3f}x** one eager forward at "
                         f"batch 1 ({f['b_ms']:.0f} ms vs {f['a_ms']:.0f} ms; target <= 0.5), {t['median']:.1f}x a "
                         f"bare `symbolic_trace` ({t['a_ms']:.0f} ms).")  # fmt: skip
    if results.get("rewrite_scale"):
        lines += ["", "Per conv, as the graph grows (`conv_to_linear(validate=False)` on stacks of 64-channel pointwise "
                  "convs against a bare `symbolic_trace` of the same stack; target: flat per conv):", "",
                  "| pointwise convs | rewrite ms | ms per conv | x a bare symbolic_trace |", "|---|---|---|---|"]
        for r in results["rewrite_scale"]:
            t = r["vs_symbolic_trace"]
            lines.append(f"| {r['convs']} | {t['b_ms']:.0f} | **{r['ms_per_conv']:.2f}** | {t['median']:.1f} "
                         f"({t['low']:.1f}..{t['high']:.1f}) |")  # fmt: skip
        lines.append("")
    if results.get("memory"):
        for r in results["memory"]:
            lines.append(f"- peak RSS growth during `linear_to_conv({r['model']}, validate=False)`: "
                         f"{r['peak_rss_growth_bytes'] / 2**20:.1f} MiB = **{100 * r['fraction_of_params']:.2f}%** of "
                         f"the {r['param_bytes'] / 2**20:.0f} MiB of parameters (target <= 5%); the first call in a "
                         f"process, which also loads torch.fx's fake-tensor code, grew "
                         f"{r['first_call_growth_bytes'] / 2**20:.1f} MiB.")  # fmt: skip
    if results.get("check_cost"):
        for r in results["check_cost"]:
            lines.append(f"- `fxsurgery check` on {r['model']}: **{r['ratio']:.2f}x** a bare export + session creation "
                         f"(rewrite+validate {r['rewrite_and_validate_s']:.1f}s, export both + cross-check "
                         f"{r['export_both_and_cross_check_s']:.1f}s, bare {r['bare_export_and_session_s']:.1f}s; "
                         "target <= 2.5).")  # fmt: skip
    if results.get("latency"):
        lines += ["", "## Latency, rewritten / original", "",
                  "| case | direction | batch | runtime | sites | ratio | noise floor | original ms | rewritten ms |",
                  "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in results["latency"]:
            ratio, noise = r["ratio"], r["noise"]
            lines.append(f"| {r['case']} | {r['direction']} | {r['batch']} | {r['runtime']} | {r['rewritten_sites']} | "
                         f"**{ratio['median']:.2f}** ({ratio['low']:.2f}..{ratio['high']:.2f}) | {noise['median']:.2f} "
                         f"({noise['low']:.2f}..{noise['high']:.2f}) | {ratio['a_ms']:.2f} | {ratio['b_ms']:.2f} |")  # fmt: skip
        lines += ["", f"![latency chart]({out.with_suffix('.png').name})"]
    if results.get("kernels"):
        lines += ["", "## The product alone (no layout change), rewritten form / original form", "",
                  "The same matrix product in both forms, each fed input already in its own layout: the part of a "
                  "latency ratio that is the runtime's kernel, not the conversions the rewrite adds.", "",
                  "| product | runtime | ratio | original form ms | rewritten form ms |", "|---|---|---|---|---|"]  # fmt: skip
        for r in results["kernels"]:
            q = r["ratio"]
            lines.append(f"| {r['case']} | {r['runtime']} | **{q['median']:.2f}** ({q['low']:.2f}..{q['high']:.2f}) | "
                         f"{q['a_ms']:.2f} | {q['b_ms']:.2f} |")  # fmt: skip
    if results.get("auto"):
        lines += ["", '## `to="auto"`, measured again', "",
                  "Each model is rewritten with `to=\"auto\"` for the runtime, then the chosen model, all-conv and all-linear "
                  "are each timed against the original, side by side (targets: auto/original <= 1.02, auto/better of "
                  "all-conv and all-linear <= 1.05, at most 10 s to choose on onnxruntime). On onnxruntime, auto times "
                  "models exported with the TorchScript exporter (fast to export); the figures here are measured on "
                  "dynamo exports (what `rewrite` ships), and the last column times the original's TorchScript export "
                  "against its dynamo export (1.00: the same speed).", "",
                  "| model | batch | runtime | chosen | sites kept / measured | auto / original | all-conv / original | "
                  "all-linear / original | auto / better | seconds to choose | TorchScript / dynamo export |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in results["auto"]:
            q = {k: f"{v['median']:.2f} ({v['low']:.2f}..{v['high']:.2f})" for k, v in r["ratios"].items()}
            lines.append(f"| {r['case']} | {r['batch']} | {r['runtime']} | {r['chosen']} | {r['sites_kept']} / "
                         f"{r['sites_measured']} | **{q['auto']}** | {q['all-conv']} | {q['all-linear']} | "
                         f"**{r['auto_vs_better']:.2f}** | **{r['auto_seconds']:.1f}** | "
                         f"{q.get('torchscript-export', '-')} |")  # fmt: skip
    lines += llm.markdown(results)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    if results.get("latency"):
        chart(results["latency"], out.with_suffix(".png"))


def chart(rows: list[dict[str, Any]], path: Path) -> None:
    """The latency rows as ratios (rewritten/original, noise floor as a band): :func:`fxsurgery.runtimes.bench.ratio_chart`."""
    from fxsurgery.runtimes.bench import ratio_chart

    ratio_chart([(f"{r['case']}, {r['direction'].replace('_', ' ')}, b{r['batch']}, {r['runtime']}", r["ratio"],
                  r["noise"]) for r in rows], path, title="fxsurgery: rewritten / original latency")  # fmt: skip


def _json(obj: Any) -> Any:
    if isinstance(obj, (Ratio, LatencyRow)):
        return asdict(obj)
    raise TypeError(type(obj).__name__)


def merge(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """``old`` with the rows ``new`` measured replaced (same case, direction, batch and runtime) or added."""
    keys = {"latency": ("case", "direction", "batch", "runtime"), "kernels": ("case", "runtime"),
            "auto": ("case", "batch", "runtime")}  # fmt: skip
    out = {**old, **{k: v for k, v in new.items() if k not in keys}}
    for suite, fields in keys.items():
        fresh = {tuple(r[f] for f in fields): r for r in new.get(suite, [])}
        rows = [fresh.pop(tuple(r[f] for f in fields), r) for r in old.get(suite, [])]
        out[suite] = rows + list(fresh.values())
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("suites", nargs="*", metavar="SUITE", help=f"any of {', '.join(SUITES)} (default: all)")
    parser.add_argument("--pairs", type=int, default=7, help="interleaved pairs per ratio")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="tiny models, one pair (a smoke run)")
    parser.add_argument("--runtimes", default="onnxruntime,torch", help="comma-separated: onnxruntime,torch")
    parser.add_argument("--only", default="", help="latency cases whose name contains this text")
    parser.add_argument("--to", choices=("conv", "linear"), help="latency cases of this direction only")
    parser.add_argument("--meta-pairs", type=int, default=3, help="alternating runs of each step of the meta suite")
    parser.add_argument("--skip", action="append", default=[], metavar="NAME@BATCH",
                        help="leave out one latency case, e.g. vgg16@32 (repeatable)")  # fmt: skip
    parser.add_argument("--out", default=str(HERE / "results"), help="output path without suffix")
    parser.add_argument("--merge", action="store_true",
                        help="keep the figures already in OUT.json and replace only those this run measures")  # fmt: skip
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    unknown = sorted(set(args.suites) - set(SUITES))
    if unknown:
        parser.error(f"unknown suite(s) {unknown}; choose from {', '.join(SUITES)}")
    suites = args.suites or list(SUITES)
    pairs = 1 if args.quick else args.pairs
    big = "tiny" if args.quick else "vgg16"
    machine = (f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} with {torch.get_num_threads()} "
               f"threads, onnxruntime {__import__('onnxruntime').__version__} CPU with {args.threads} intra-op threads")  # fmt: skip
    print(f"machine: {machine}")
    results: dict[str, Any] = {"machine": machine}
    if "cost" in suites:
        results["rewrite_cost"] = [rewrite_cost(big, pairs)]
        results["rewrite_scale"] = rewrite_scale(pairs, (8, 16) if args.quick else SCALE_DEPTHS)
    if "memory" in suites:
        results["memory"] = [memory(big)]
    if "check" in suites:
        results["check_cost"] = [check_cost("tiny" if args.quick else "resnet50")]
    if "latency" in suites:
        cases = [c for c in latency_cases(args.quick)
                 if args.only in c.name and c.key not in args.skip and args.to in (None, c.to)]  # fmt: skip
        rows = latency(cases, pairs, args.threads, tuple(args.runtimes.split(",")))
        results["latency"] = [asdict(r) for r in rows]
    if "kernels" in suites:
        results["kernels"] = kernels(pairs, args.threads, tuple(args.runtimes.split(",")), args.quick)
    if "auto" in suites:
        cases = [c for c in auto_cases(args.quick) if args.only in c.name and c.key not in args.skip]
        runtimes = tuple("torch eager" if r == "torch" else r for r in args.runtimes.split(","))
        results["auto"] = auto(cases, pairs, args.threads, runtimes)
    if "meta" in suites:
        names = ["tiny"] if args.quick else ["llama-2-7b", "llama-3-8b", "llama-3-70b", "mixtral-8x7b"]
        results["meta"] = [llm.meta_rewrite(n, pairs=1 if args.quick else args.meta_pairs) for n in names]
    if "convert" in suites:
        results["convert"] = [llm.streamed_convert("tiny" if args.quick else "llama-3.2-1b", 1 if args.quick else 3)]
    command = ("python -m benchmarks " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    if args.merge and Path(args.out).with_suffix(".json").exists():
        results = merge(json.loads(Path(args.out).with_suffix(".json").read_text()), results)
        command = f"{results.get('command', 'python -m benchmarks')}`, then `{command}"
    results["command"] = command
    write_outputs(results, Path(args.out), command)
    print(f"wrote {args.out}.json, .md and .png")
    return 0
