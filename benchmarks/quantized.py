"""Quantize, then rewrite: PT2E (torchao's ``prepare_pt2e``/``convert_pt2e``, XNNPACKQuantizer symmetric
per-channel, calibrated on the example inputs) on the demo model, resnet18 and tiny HuggingFace BERT and Llama, then
``fxsurgery.linear_to_conv`` on the converted program. Per model: the quantized Linears and how many were rewritten,
whether the rewritten program's outputs are bit-identical to the quantized original's, the transposes
(permute/transpose/t) and views in both graphs, and the broken islands: a layout op between a dequantize and the
linear/conv it feeds (0 is what a backend's int8 lowering needs). Where ExecuTorch is installed: whether both lower
with the XNNPACK partitioner, and whether the ``.pte`` programs' outputs are identical. Rewrite, then quantize:
``fxsurgery.check(model, x, quantize="int8", ...)`` quantizes the float model and its rewrite with one recipe (PT2E;
onnxruntime static QDQ on the ONNX files) and compares them on 8 fresh batches: the share of int8 outputs within one
output step of the original's, the requantizations (quantizes that round anew), the error of each against the float
model, and whether both lower to XNNPACK; rows marked "no quantize=" are rewrites made without the hint.

Run: ``python -m benchmarks.quantized [--out benchmarks/quantized.md]`` (needs ``pip install -e ".[quant]"``;
torchvision and transformers from the test extra).
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import fxsurgery
from fxsurgery.engine.emit import op_name
from fxsurgery.rules.aten.qdq import is_dequantize
from fxsurgery.verify.quantized import compare_quantized, layout_census, lowered_outputs, quantize_pt2e, quantizer_of

Build = Callable[[], tuple[nn.Module, tuple[torch.Tensor, ...]]]


class Logits(nn.Module):
    """A HuggingFace model called on token ids (its other inputs fixed), returning its logits."""

    def __init__(self, model: nn.Module, **fixed: Any) -> None:
        super().__init__()
        self.model, self.fixed = model, fixed

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(ids, **self.fixed).logits


def models() -> dict[str, Build]:
    def demo() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
        from fxsurgery.models import demo_model

        return demo_model(), (torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)),)

    def resnet18() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
        import torchvision

        return torchvision.models.resnet18(weights=None), (torch.randn(2, 3, 64, 64),)

    def bert() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
        import transformers as T

        config = T.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                              intermediate_size=64, num_labels=3)  # fmt: skip
        ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(1))
        return Logits(T.BertForSequenceClassification(config)), (ids,)

    def llama() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
        import transformers as T

        config = T.LlamaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=64, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
        ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(1))
        # the causal mask and positions given (PT2E's prepared graph cannot run transformers' own mask building)
        mask = torch.tril(torch.ones(8, 8, dtype=torch.bool)).expand(2, 1, 8, 8)
        fixed = {"attention_mask": mask, "position_ids": torch.arange(8).expand(2, 8), "use_cache": False}
        return Logits(T.LlamaForCausalLM(config), **fixed), (ids,)

    def seeded(build: Build) -> Build:
        return lambda: (torch.manual_seed(0), build())[1]  # the same weights in every table

    return {name: seeded(b) for name, b in (("demo", demo), ("resnet18", resnet18), ("bert", bert), ("llama", llama))}


def quantize(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> torch.export.ExportedProgram:
    """``model`` quantized with PT2E (XNNPACKQuantizer, symmetric per-channel), calibrated on ``inputs``, exported."""
    torch.manual_seed(0)
    return quantize_pt2e(model.eval(), quantizer_of("int8")[1], [inputs])


def census(program: torch.export.ExportedProgram) -> dict[str, int]:
    return layout_census(program.graph)


def row(name: str, build: Callable[[], tuple[nn.Module, tuple[torch.Tensor, ...]]]) -> dict[str, Any]:
    model, inputs = build()
    program = quantize(model, inputs)
    result = fxsurgery.linear_to_conv(program, inputs)
    new = result.program
    ref, got = program.module()(*inputs), new.module()(*inputs)
    before, after = census(program), census(new)
    out: dict[str, Any] = {
        "model": name,
        "quantized linears": _linears(program),
        "rewritten": len(result.rewritten),
        "bit-identical": bool(torch.equal(ref, got)),
        "transposes": f"{before['transposes']} -> {after['transposes']}",
        "views": f"{before['views']} -> {after['views']}",
        "copies": f"{before['copies']} -> {after['copies']}",
        "broken islands": f"{before['broken islands']} -> {after['broken islands']}",
    }
    lowered = [lowered_outputs(p, inputs) for p in (program, new)]
    if all(isinstance(v, list) for v in lowered):
        diff = float((lowered[0][0] - lowered[1][0]).abs().max())
        out["XNNPACK .pte"] = "identical" if diff == 0 else f"max diff {diff:.3g}"
    else:
        out["XNNPACK .pte"] = next(v for v in lowered if isinstance(v, str))
    return out


def against_qnn(name: str, build: Build) -> dict[str, Any] | None:
    """fxsurgery and ExecuTorch's Qualcomm ``ConvertLinearToConv2d`` (run without the QNN SDK) on the same quantized
    program, both counted in the Edge dialect the QNN pass works in; None without ExecuTorch."""
    try:
        from executorch.backends.qualcomm._passes.convert_linear_to_conv2d import ConvertLinearToConv2d
        from executorch.exir import EdgeCompileConfig, to_edge
    except ImportError:
        return None
    model, inputs = build()
    program = quantize(model, inputs)
    config = EdgeCompileConfig(_check_ir_validity=False, preserve_ops=[torch.ops.aten.linear.default])
    edge = lambda p: to_edge(p, compile_config=config).exported_program()  # noqa: E731
    original, qnn = edge(program), edge(program)
    ConvertLinearToConv2d(qnn)(qnn.graph_module)
    ours = edge(fxsurgery.linear_to_conv(program, inputs).program)
    base = census(original)
    added = {k: {who: census(ep)[k] - base[k] for who, ep in (("QNN", qnn), ("fxsurgery", ours))} for k in base}
    convs = lambda ep: sum(op_name(n.target) == "aten::convolution" for n in ep.graph.nodes)  # noqa: E731
    same = lambda ep: bool(torch.equal(ep.module()(*inputs), program.module()(*inputs)))  # noqa: E731
    return {
        "model": name,
        "Linears rewritten: QNN / fxsurgery": f"{convs(qnn) - convs(original)} / {convs(ours) - convs(original)} "
        f"of {_linears(program)}",
        "permutes added": f"{added['transposes']['QNN']} / {added['transposes']['fxsurgery']}",
        "views added": f"{added['views']['QNN']} / {added['views']['fxsurgery']}",
        "copies added": f"{added['copies']['QNN']} / {added['copies']['fxsurgery']}",
        "broken islands": f"{census(qnn)['broken islands']} / {census(ours)['broken islands']}",
        "bit-identical": f"{same(qnn)} / {same(ours)}",
    }


def _linears(program: torch.export.ExportedProgram) -> int:
    """The quantized Linears of ``program`` (a linear fed a dequantized weight)."""
    return sum(
        op_name(n.target) in ("aten::linear", "aten::addmm", "aten::mm") and any(map(is_dequantize, n.all_input_nodes))
        for n in program.graph.nodes
    )


def then_quantized(name: str, build: Build, hint: bool = True, **options: Any) -> dict[str, Any]:
    """Rewrite the float model, then quantize both it and the original with the same recipe and calibration:
    ``fxsurgery.check(..., quantize="int8")`` (PT2E and onnxruntime static QDQ); ``hint=False``: the rewrite made
    without ``quantize=`` (its forms not chosen for quantization), compared by PT2E only."""
    model, inputs = build()
    model.eval()
    if hint:
        with tempfile.TemporaryDirectory() as tmp:
            report = fxsurgery.check(model, inputs, out_dir=tmp, quantize="int8", **options)
        sites, q = len(report.surgery.rewritten), report.quantized
    else:
        rewritten = fxsurgery.linear_to_conv(model, inputs, **options)
        sites, q = len(rewritten.rewritten), compare_quantized(model, rewritten.module, inputs, "int8")
    a, b = q.census["original"]["requantizations"], q.census["rewritten"]["requantizations"]
    return {
        "model": name + "".join(f" {k}={v}" for k, v in options.items()) + ("" if hint else " (no quantize=)"),
        "sites rewritten": sites,
        "within 1 step": "n/a" if q.within_one_step is None else f"{q.within_one_step:.1%}",
        "identical": f"{q.identical:.1%}",
        "requantizations": f"{a} -> {b}",
        "PT2E error vs float": _pair(q.error),
        "ORT QDQ error vs float": _pair(q.onnx_error) if q.onnx_error else "-",
        "XNNPACK": q.lowering.split(" (pip")[0],
    }


def _pair(errors: dict[str, float]) -> str:
    a, b = errors["original"], errors["rewritten"]
    return f"{a:.4f} -> {b:.4f} ({b / a - 1:+.1%})"


def _table(rows: list[dict[str, Any]]) -> str:
    head = list(rows[0])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(str(r[k]) for k in head) + " |" for r in rows])


#: the rewrite-then-quantize rows with other options than the defaults
_OPTIONS = [("demo", {"batch_layout": "batch"}), ("resnet18", {"batch_layout": "batch"}),
            ("bert", {"token_layout": True}), ("llama", {"token_layout": True})]  # fmt: skip
#: the same without quantize= (the forms the rewrite emits for float deployment)
_PLAIN = [("demo", {}), ("bert", {"token_layout": True}), ("llama", {"token_layout": True})]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.quantized")
    parser.add_argument("--out", type=Path, default=None, help="write the table (Markdown) here")
    parser.add_argument("--models", nargs="*", default=list(models()))
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    first = _table([row(name, models()[name]) for name in args.models])
    print(first)
    later = [then_quantized(name, models()[name]) for name in args.models]
    later += [then_quantized(name, models()[name], **opts) for name, opts in _OPTIONS if name in args.models]
    later += [then_quantized(name, models()[name], False, **opts) for name, opts in _PLAIN if name in args.models]
    second = _table(later)
    print(second)
    table = f"Quantize, then rewrite:\n\n{first}\n\nRewrite, then quantize:\n\n{second}"
    qnn = [r for r in (against_qnn(name, models()[name]) for name in args.models) if r is not None]
    if qnn:
        print(_table(qnn))
        head = "Against ExecuTorch's Qualcomm ConvertLinearToConv2d (QNN / fxsurgery, Edge dialect)"
        table += f"\n\n{head}:\n\n{_table(qnn)}"
    if args.out:
        args.out.write_text(f"{__doc__.split(chr(10) + chr(10))[0]}\n\n{table}\n")


if __name__ == "__main__":
    main()
