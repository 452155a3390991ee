"""Quantize, then rewrite: PT2E (torchao's ``prepare_pt2e``/``convert_pt2e``, XNNPACKQuantizer symmetric
per-channel, calibrated on the example inputs) on the demo model, resnet18 and tiny HuggingFace BERT and Llama, then
``fxsurgery.linear_to_conv`` on the converted program. Per model: the quantized Linears and how many were rewritten,
whether the rewritten program's outputs are bit-identical to the quantized original's, the transposes
(permute/transpose/t) and views in both graphs, and the broken islands: a layout op between a dequantize and the
linear/conv it feeds (0 is what a backend's int8 lowering needs). Where ExecuTorch is installed: whether both lower
with the XNNPACK partitioner, and whether the ``.pte`` programs' outputs are identical.

Run: ``python -m benchmarks.quantized [--out benchmarks/quantized.md]`` (needs ``pip install -e ".[quant]"``;
torchvision and transformers from the test extra).
"""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import fxsurgery
from fxsurgery.engine.emit import op_name
from fxsurgery.rules.aten.qdq import is_dequantize

_TRANSPOSES = ("aten::permute", "aten::permute_copy", "aten::transpose", "aten::t")
_VIEWS = ("aten::view", "aten::view_copy", "aten::reshape", "aten::_unsafe_view", "aten::flatten")
_COPIES = ("aten::clone", "dim_order_ops::_clone_dim_order")
_OPS = ("aten::linear", "aten::convolution", "aten::conv2d", "aten::addmm", "aten::mm")


class Logits(nn.Module):
    """A HuggingFace model called on token ids (its other inputs fixed), returning its logits."""

    def __init__(self, model: nn.Module, **fixed: Any) -> None:
        super().__init__()
        self.model, self.fixed = model, fixed

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(ids, **self.fixed).logits


def models() -> dict[str, Callable[[], tuple[nn.Module, tuple[torch.Tensor, ...]]]]:
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

    return {"demo": demo, "resnet18": resnet18, "bert": bert, "llama": llama}


def quantize(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> torch.export.ExportedProgram:
    """``model`` quantized with PT2E (XNNPACKQuantizer, symmetric per-channel), calibrated on ``inputs``, exported."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.testing.pt2e._xnnpack_quantizer import XNNPACKQuantizer, get_symmetric_quantization_config

    torch.manual_seed(0)
    model.eval()
    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    prepared = prepare_pt2e(torch.export.export(model, inputs, strict=False).module(), quantizer)
    prepared(*inputs)
    return torch.export.export(convert_pt2e(prepared), inputs, strict=False)


def census(program: torch.export.ExportedProgram) -> dict[str, int]:
    """Quantized linears, transposes, views and broken islands (a layout op between a dequantize and its op)."""
    nodes = [n for n in program.graph.nodes if n.op == "call_function"]
    names = [op_name(n.target) for n in nodes]
    broken = 0
    for n in nodes:
        if op_name(n.target) not in _OPS:
            continue
        for a in n.all_input_nodes:
            if op_name(a.target) in (*_TRANSPOSES, *_VIEWS) and is_dequantize(a.args[0]):
                broken += 1
    linears = sum(op_name(n.target) in ("aten::linear", "aten::addmm", "aten::mm") and any(
        is_dequantize(a) for a in n.all_input_nodes) for n in nodes)  # fmt: skip
    return {
        "linears": linears,
        "transposes": sum(n in _TRANSPOSES for n in names),
        "views": sum(n in _VIEWS for n in names),
        "copies": sum(n in _COPIES for n in names),
        "broken": broken,
    }


def lowered_outputs(program: torch.export.ExportedProgram, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor | str:
    """The outputs of ``program`` lowered to XNNPACK (``.pte`` run by ExecuTorch's runtime), or why not."""
    try:
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.exir import to_edge_transform_and_lower
        from executorch.runtime import Runtime
    except ImportError:
        return "ExecuTorch not installed"
    try:
        pte = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()]).to_executorch().buffer
        method = Runtime.get().load_program(pte).load_method("forward")
        return method.execute(list(inputs))[0]
    except Exception as e:
        return f"does not lower: {type(e).__name__}: {str(e).splitlines()[0][:120]}"


def row(name: str, build: Callable[[], tuple[nn.Module, tuple[torch.Tensor, ...]]]) -> dict[str, Any]:
    model, inputs = build()
    program = quantize(model, inputs)
    result = fxsurgery.linear_to_conv(program, inputs)
    new = result.program
    ref, got = program.module()(*inputs), new.module()(*inputs)
    before, after = census(program), census(new)
    out: dict[str, Any] = {
        "model": name,
        "quantized linears": before["linears"],
        "rewritten": len(result.rewritten),
        "bit-identical": bool(torch.equal(ref, got)),
        "transposes": f"{before['transposes']} -> {after['transposes']}",
        "views": f"{before['views']} -> {after['views']}",
        "copies": f"{before['copies']} -> {after['copies']}",
        "broken islands": f"{before['broken']} -> {after['broken']}",
    }
    lowered = [lowered_outputs(p, inputs) for p in (program, new)]
    if all(isinstance(v, torch.Tensor) for v in lowered):
        diff = float((lowered[0] - lowered[1]).abs().max())
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
        f"of {base['linears']}",
        "permutes added": f"{added['transposes']['QNN']} / {added['transposes']['fxsurgery']}",
        "views added": f"{added['views']['QNN']} / {added['views']['fxsurgery']}",
        "copies added": f"{added['copies']['QNN']} / {added['copies']['fxsurgery']}",
        "broken islands": f"{census(qnn)['broken']} / {census(ours)['broken']}",
        "bit-identical": f"{same(qnn)} / {same(ours)}",
    }


def _output_scale(program: torch.export.ExportedProgram) -> float:
    """The scale of the dequantize that makes the program's (first) output."""
    out = next(n for n in program.graph.nodes if n.op == "output").args[0]
    node = out[0] if isinstance(out, (tuple, list)) else out
    return float(node.args[1]) if is_dequantize(node) else float("nan")


Build = Callable[[], tuple[nn.Module, tuple[torch.Tensor, ...]]]


def then_quantized(name: str, build: Build, **options: Any) -> dict[str, Any]:
    """Rewrite the float model, then quantize both it and the original with the same recipe and calibration."""
    model, inputs = build()
    model.eval()
    rewritten = fxsurgery.linear_to_conv(model, inputs, **options)
    original_q, rewritten_q = quantize(model, inputs), quantize(rewritten.module, inputs)
    x = tuple(torch.randn_like(t) if t.is_floating_point() else t for t in inputs)  # not the calibration data
    float_out, a, b = model(*x), original_q.module()(*x), rewritten_q.module()(*x)
    if not isinstance(float_out, torch.Tensor):
        float_out = float_out[0]
    step = _output_scale(original_q)
    err = lambda q: float((q - float_out).norm() / float_out.norm())  # noqa: E731
    requant = lambda p: sum(op_name(n.target) == "quantized_decomposed::quantize_per_tensor" for n in p.graph.nodes)  # noqa: E731
    return {
        "model": name + "".join(f" ({k}={v})" for k, v in options.items()),
        "sites rewritten": len(rewritten.rewritten),
        "within 1 LSB": f"{float(((a - b).abs() <= step * 1.001).float().mean()):.1%}",
        "bit-identical": f"{float((a == b).float().mean()):.1%}",
        "quantizes": f"{requant(original_q)} -> {requant(rewritten_q)}",
        "error vs float: original": f"{err(a):.4f}",
        "rewritten": f"{err(b):.4f} ({err(b) / err(a) - 1:+.0%})",
    }


def _table(rows: list[dict[str, Any]]) -> str:
    head = list(rows[0])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(str(r[k]) for k in head) + " |" for r in rows])


#: the rewrite-then-quantize rows with other options than the defaults
_OPTIONS = [("demo", {"batch_layout": "batch"}), ("resnet18", {"batch_layout": "batch"}),
            ("bert", {"token_layout": True}), ("llama", {"token_layout": True})]  # fmt: skip


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
