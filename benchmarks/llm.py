"""Language models at full size (issue 14): surgery on the meta device, and streamed checkpoint conversion.

    python -m benchmarks meta convert      # both; figures in benchmarks/results.{json,md}

Each measurement runs in a fresh subprocess (peak RSS from ``/proc/self/status``: the high-water mark is reset with
``/proc/self/clear_refs`` once the model is built, so the figure is the step's own growth), the baseline and the
measured steps alternating (A B C ..., then ... C B A), side by side in one run; each ratio is taken pair by pair (a
rewrite against the baseline run beside it), and the median of those is reported with its spread:

* ``meta``: ``linear_to_conv(model_on_meta, meta_ids, validate=False, token_layout=True)`` against the bare
  ``torch.export.export(model, (ids,), strict=False)`` it starts from, on Llama-2-7B, Llama-3-8B, Llama-3-70B and
  Mixtral-8x7B shapes (its sites: the attention's Linears, the router, the fused experts); the default rewrite (a
  dynamic batch) against the export with a dynamic batch too, and the rewrite with ``dynamic_batch=False``.
* ``convert``: ``fxsurgery.convert_checkpoint`` of a Llama-3.2-1B-shaped checkpoint (random bf16 weights written
  here, in two shards) against a plain ``safetensors`` ``load_file`` + ``save_file`` of the same files.
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["CONFIGS", "meta_rewrite", "streamed_convert"]

HERE = Path(__file__).resolve().parent
#: transformers LlamaConfig arguments.
CONFIGS = {
    "llama-2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000),
    "llama-3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256),
    "llama-3-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                        num_key_value_heads=8, vocab_size=128256),
    # Mixtral-8x7B: 8 experts (top 2) per layer, fused; each layer's sites: q/k/v/o, the router, the experts
    "mixtral-8x7b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=32000, num_local_experts=8, num_experts_per_tok=2,
                         arch="Mixtral"),
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256, tie_word_embeddings=True),  # --quick
}  # fmt: skip

_PRELUDE = """
import gc, json, sys, time, warnings
sys.path.insert(0, {root!r})
warnings.filterwarnings("ignore")
import torch, transformers
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
def measured(step):
    gc.collect()
    before = status("VmRSS:")
    open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) starts again from here
    start = time.perf_counter()
    out = step()
    return time.perf_counter() - start, status("VmHWM:") - before, status("VmHWM:"), out
"""

_META = _PRELUDE + """
import fxsurgery
kw = {config}
arch = kw.pop("arch", "Llama")
config = getattr(transformers, arch + "Config")(**kw)
with torch.device("meta"):
    model = getattr(transformers, arch + "ForCausalLM")(config).eval()
ids = torch.zeros(1, 16, dtype=torch.long, device="meta")
from transformers.integrations.executorch import register_dynamic_cache_export_support
register_dynamic_cache_export_support()  # so that the bare export can return the DynamicCache (fxsurgery does too)
ids2, auto = torch.zeros(2, 16, dtype=torch.long, device="meta"), torch.export.Dim.AUTO
linears = lambda ep: len([n for n in ep.graph.nodes if n.op == "call_function" and "linear" in str(n.target)])
if {which!r} == "export":
    step = lambda: linears(torch.export.export(model, (ids,), strict=False))
elif {which!r} == "dynamic":  # what fxsurgery captures: a batch of 2, the batch dynamic (a batch-1 graph is static)
    step = lambda: linears(torch.export.export(model, (ids2,), dynamic_shapes=({{0: auto}},), strict=False))
elif {which!r} == "static":  # fxsurgery asked for the example's batch, fixed (dynamic_batch=False)
    step = lambda: len(fxsurgery.linear_to_conv(model, (ids,), validate=False, token_layout=True,
                                                dynamic_batch=False).rewritten)
else:
    step = lambda: len(fxsurgery.linear_to_conv(model, (ids,), validate=False, token_layout=True).rewritten)
seconds, growth, peak, count = measured(step)
print(json.dumps({{"seconds": seconds, "rss_growth": growth, "peak_rss": peak, "count": count}}))
"""

_CONVERT = _PRELUDE + """
from pathlib import Path
from safetensors.torch import load_file, save_file
import fxsurgery
src, dst = Path({src!r}), Path({dst!r})
shutil = __import__("shutil")
shutil.rmtree(dst, ignore_errors=True)
def plain():
    dst.mkdir()
    for f in sorted(src.glob("*.safetensors")):
        save_file(load_file(f), str(dst / f.name), metadata={{"format": "pt"}})
def streamed():
    return fxsurgery.convert_checkpoint({layouts!r}, src, dst)
seconds, growth, peak, out = measured(plain if {which!r} == "plain" else streamed)
print(json.dumps({{"seconds": seconds, "rss_growth": growth, "peak_rss": peak}}))
"""


def _child(code: str) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _alternate(*codes: str, pairs: int) -> list[list[dict[str, Any]]]:
    """Each code run ``pairs`` times, in fresh processes, in the order A B C, C B A, ...: one list of results per code."""
    out: list[list[dict[str, Any]]] = [[] for _ in codes]
    for i in range(pairs):
        order = range(len(codes)) if i % 2 == 0 else reversed(range(len(codes)))
        for k in order:
            out[k].append(_child(codes[k]))
    return out


def _pair_ratios(measured: list[dict[str, Any]], baseline: list[dict[str, Any]]) -> list[float]:
    """The time of each measured run over that of the baseline run of the same pair."""
    return [m["seconds"] / b["seconds"] for m, b in zip(measured, baseline)]


def _summary(rows: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def meta_rewrite(name: str, pairs: int = 2) -> dict[str, Any]:
    """The meta-device rewrite of one config against its bare export, ``pairs`` of each, alternating."""
    root, config = str(HERE.parent), repr(CONFIGS[name])
    # each rewrite next to its baseline: export, static rewrite, dynamic export, rewrite; then the other way
    export, static, dynamic, rewrite = _alternate(*(_META.format(root=root, config=config, which=w)
                                                    for w in ("export", "static", "dynamic", "rewrite")),
                                                  pairs=pairs)  # fmt: skip
    per_layer = 6 if "num_local_experts" in CONFIGS[name] else 7  # an experts layer and a router for the MLP's 3
    blocks = CONFIGS[name]["num_hidden_layers"] * per_layer
    out = {"model": name, "export_s": _summary(export, "seconds"), "rewrite_s": _summary(rewrite, "seconds"),
           "export_peak_rss": _summary(export, "peak_rss"), "rewrite_peak_rss": _summary(rewrite, "peak_rss"),
           "rewrite_rss_growth": _summary(rewrite, "rss_growth"), "linear_nodes": export[0]["count"],
           "rewritten": rewrite[0]["count"], "block_linears": blocks, "pairs": pairs,
           "rewrite_s_all": [r["seconds"] for r in rewrite], "export_s_all": [r["seconds"] for r in export],
           "dynamic_export_s": _summary(dynamic, "seconds"), "dynamic_export_s_all": [r["seconds"] for r in dynamic],
           "static_rewrite_s": _summary(static, "seconds"), "static_rewrite_s_all": [r["seconds"] for r in static],
           "static_rewrite_peak_rss": _summary(static, "peak_rss"), "static_rewritten": static[0]["count"],
           # the ratios pair by pair (a rewrite against the baseline run beside it), their median and spread
           "dynamic_ratios": _pair_ratios(rewrite, dynamic), "static_ratios": _pair_ratios(static, export)}  # fmt: skip
    print(f"  meta {name}: rewrite {out['rewrite_s']:.1f}s, peak RSS {out['rewrite_peak_rss'] / 2**30:.2f} GiB "
          f"({out['rewritten']} sites rewritten; {blocks} in the blocks); bare export {out['export_s']:.1f}s, "
          f"{out['export_peak_rss'] / 2**30:.2f} GiB; x export (dynamic / static batch) "
          f"{statistics.median(out['dynamic_ratios']):.2f} / {statistics.median(out['static_ratios']):.2f}", flush=True)
    return out


def _write_checkpoint(folder: Path, config: dict[str, Any]) -> tuple[int, int]:
    """Random bf16 weights with the model's names and shapes, in two shards with an index; (bytes, largest)."""
    import torch
    import transformers
    from safetensors.torch import save_file

    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied
    names = list(shapes)
    shards = [names[: len(names) // 2], names[len(names) // 2 :]]
    weight_map, total, largest = {}, 0, 0
    generator = torch.Generator().manual_seed(0)
    for i, part in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {k: torch.randn(shapes[k], generator=generator).to(torch.bfloat16) for k in part}
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        for k, t in tensors.items():
            weight_map[k] = file
            total += t.numel() * 2
            largest = max(largest, t.numel() * 2)
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return total, largest


def _layouts(config: dict[str, Any], path: Path) -> int:
    import torch
    import transformers

    import fxsurgery
    from fxsurgery.artifacts.checkpoint import save_layouts

    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)).eval()
    res = fxsurgery.linear_to_conv(model, (torch.zeros(1, 16, dtype=torch.long, device="meta"),), validate=False,
                                   token_layout=True)  # fmt: skip
    save_layouts(res, path)
    return len(res.rewritten)


def streamed_convert(name: str = "llama-3.2-1b", pairs: int = 2) -> dict[str, Any]:
    """convert_checkpoint against a plain safetensors read + write of the same shards, ``pairs`` of each."""
    config = CONFIGS[name]
    with tempfile.TemporaryDirectory(dir=HERE.parent) as tmp:
        src, dst = Path(tmp) / "src", Path(tmp) / "dst"
        src.mkdir()
        total, largest = _write_checkpoint(src, config)
        layouts = Path(tmp) / "layouts.json"
        rewritten = _layouts(config, layouts)
        args = {"root": str(HERE.parent), "src": str(src), "dst": str(dst), "layouts": str(layouts)}
        plain, streamed = _alternate(_CONVERT.format(which="plain", **args), _CONVERT.format(which="streamed", **args),
                                     pairs=pairs)  # fmt: skip
        shutil.rmtree(dst, ignore_errors=True)
    out = {"model": name, "bytes": total, "largest_tensor_bytes": largest, "rewritten": rewritten, "pairs": pairs,
           "plain_s": _summary(plain, "seconds"), "streamed_s": _summary(streamed, "seconds"),
           "plain_rss_growth": _summary(plain, "rss_growth"), "streamed_rss_growth": _summary(streamed, "rss_growth"),
           "ratios": _pair_ratios(streamed, plain)}  # fmt: skip
    out["ratio"] = statistics.median(out["ratios"])
    print(f"  convert {name} ({total / 2**30:.2f} GiB bf16, largest tensor {largest / 2**20:.0f} MiB): streamed "
          f"{out['streamed_s']:.1f}s, RSS +{out['streamed_rss_growth'] / 2**20:.0f} MiB; plain safetensors read+write "
          f"{out['plain_s']:.1f}s, RSS +{out['plain_rss_growth'] / 2**20:.0f} MiB; ratio {out['ratio']:.2f}", flush=True)
    return out


def _ratio(ratios: list[float] | None) -> str:
    """The median of per-pair ratios, bold, with their spread."""
    if not ratios:
        return "n/a"
    return f"**{statistics.median(ratios):.2f}** ({min(ratios):.2f}..{max(ratios):.2f})"


def markdown(results: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    if results.get("meta"):
        lines += ["", "## Language models on the meta device", "",
                  "`linear_to_conv(model_on_meta, ids_on_meta, validate=False, token_layout=True)` against the bare "
                  "`torch.export.export` (fresh process each, alternating; targets: under 20 s and 1.5 GB peak RSS; "
                  "the rewrite at most 1.5x the bare export's time, #25). The ratios are taken pair by pair, each "
                  "rewrite against the bare export run beside it: their median, with the lowest and highest in "
                  "parentheses (the spread is the machine's noise; the times are medians). Each rewrite against the bare export "
                  "of the same shapes: by default fxsurgery captures a batch of 2 with the batch dynamic (its graph "
                  "runs any batch), against a dynamic-batch export; with `dynamic_batch=False` it captures the "
                  "batch-1 example as it is (the fixed batch an NPU runs at), against a static export.", "",
                  "| config | rewritten sites | rewrite s (dynamic / static batch) | peak RSS | bare export s "
                  "(dynamic / static batch) | export peak RSS | x export, dynamic batch | x export, static batch |",
                  "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in results["meta"]:
            dynamic, static = r.get("dynamic_export_s"), r.get("static_rewrite_s")
            nan = float("nan")
            lines.append(f"| {r['model']} | {r['rewritten']} (the blocks hold {r['block_linears']}; the rest: LM head) | "
                         f"{r['rewrite_s']:.1f} / {static or nan:.1f} | **{r['rewrite_peak_rss'] / 2**30:.2f} GiB** | "
                         f"{dynamic or nan:.1f} / {r['export_s']:.1f} | "
                         f"{r['export_peak_rss'] / 2**30:.2f} GiB | {_ratio(r.get('dynamic_ratios'))} | "
                         f"{_ratio(r.get('static_ratios'))} |")  # fmt: skip
    if results.get("convert"):
        lines += ["", "## Streamed checkpoint conversion", ""]
        for r in results["convert"]:
            limit = 2 * r["largest_tensor_bytes"] + 300 * 2**20
            lines.append(f"- `convert_checkpoint` of a {r['model']}-shaped checkpoint ({r['bytes'] / 2**30:.2f} GiB "
                         f"bf16 in two shards, {r['rewritten']} Linears rewritten): **{r['ratio']:.2f}x** the time of "
                         f"a plain safetensors `load_file` + `save_file` of the same shards ({r['streamed_s']:.1f}s vs "
                         f"{r['plain_s']:.1f}s; target <= 1.5), peak RSS growth **"
                         f"{r['streamed_rss_growth'] / 2**20:.0f} MiB** (plain: {r['plain_rss_growth'] / 2**20:.0f} "
                         f"MiB; target <= 2 x the largest tensor + 300 MB = {limit / 2**20:.0f} MiB).")  # fmt: skip
    return lines
