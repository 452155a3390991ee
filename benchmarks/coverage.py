"""Coverage over torchvision's classification models: rewrite, validate and ONNX cross-check, both directions.

    python -m benchmarks.coverage                       # every model (slow: about an hour on 2 cores)
    python -m benchmarks.coverage resnet18 vgg11        # a few
    python -m benchmarks.coverage --no-onnx             # rewrite + validation only
    python -m benchmarks.coverage --rerun               # every row of coverage.json again, same exporter per row
    python -m benchmarks.coverage --rerun --token-layout vit_b_16   # only its token-layout row
    python -m benchmarks.coverage --frontend export --out benchmarks/coverage-export   # through torch.export

Needs torchvision (``pip install torch==2.14.1 torchvision==0.29.1`` on these machines). Models are built with
``weights=None`` (no downloads). Writes ``benchmarks/coverage.json`` (one record per model and direction, updated
after each model) and ``benchmarks/coverage.md``.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import shutil
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

import torch

import fxsurgery

HERE = Path(__file__).resolve().parent
INPUT_SIZE = {"inception_v3": 299}
DIRECTIONS = {"conv": "linear_to_conv", "linear": "conv_to_linear"}
#: The opt-in token layout (``--token-layout``): a third row per model, Linear -> conv with ``token_layout=True``.
TOKENS = "linear_to_conv+tokens"


def all_models() -> list[str]:
    """Every classification model, smallest first (parameter counts from torchvision's metadata, no download)."""
    import torchvision

    def size(name: str) -> int:
        try:
            return int(torchvision.models.get_model_weights(name).DEFAULT.meta["num_params"])
        except Exception:
            return 0

    return sorted(torchvision.models.list_models(module=torchvision.models), key=lambda n: (size(n), n))


def build(name: str) -> tuple[torch.nn.Module, torch.Tensor]:
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    for m in model.modules():  # a zero-initialised head (ViT) makes every output 0: a comparison would see nothing
        if isinstance(m, torch.nn.Linear) and not m.weight.any():
            torch.nn.init.normal_(m.weight, std=0.02)
    size = INPUT_SIZE.get(name, 224)
    if _ignores_input(model, size):
        # GoogLeNet's initialisation (truncated normal, std 0.01) shrinks the activations to nothing before the
        # head, so every output is its bias: give convs and Linears torch's default initialisation instead
        for m in model.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                m.reset_parameters()
    return model, torch.randn(1, 3, size, size)


def _ignores_input(model: torch.nn.Module, size: int) -> bool:
    """Whether two different images give the same output (one forward of a batch of two)."""
    with torch.no_grad():
        out = model(torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1)))
    out = out if isinstance(out, torch.Tensor) else out[0]
    return bool(torch.equal(out[0], out[1]))


def run_one(name: str, to: str, onnx: bool, exporter: str = "dynamo", tokens: bool = False,
            frontend: str = "auto", hf: bool = False) -> dict[str, Any]:  # fmt: skip
    """One model, one direction: a record for the table. Never raises."""
    direction = TOKENS if tokens else DIRECTIONS[to]
    record: dict[str, Any] = {"model": name, "direction": direction, "exporter": exporter if onnx else None,
                              "frontend_asked": frontend}  # fmt: skip
    start = time.perf_counter()
    out_dir = Path(tempfile.mkdtemp(prefix="fxsurgery-coverage-"))
    try:
        blocks = None
        if hf:
            from benchmarks import hf_models

            model, x, pattern = hf_models.build(name)
            blocks = hf_models.block_linears(model, pattern)
        else:
            model, x = build(name)
        extra: dict[str, Any] = {"token_layout": True} if tokens else {}
        extra["frontend"] = frontend
        export_error = None
        try:
            report = fxsurgery.check(model, x, to, out_dir, onnx=onnx, exporter=exporter, num_random=1, **extra)
        except fxsurgery.SurgeryError as e:
            if not str(e).startswith("ONNX export of the original model failed"):
                raise
            export_error = str(e).split("; try ")[0]  # the rewrite is still measured: without the cross-check
            report = fxsurgery.check(model, x, to, out_dir, onnx=False, num_random=1, **extra)
        res = report.surgery
        if blocks is not None:  # the Linear layers of the attention and MLP blocks, and how many were rewritten
            record["block_linears"] = [len(blocks & {s.name for s in res.rewritten}), len(blocks)]
        record.update(
            frontend=res.frontend,
            candidates=len(res.sites),
            rewritten=len(res.rewritten),
            skipped=len(res.skipped),
            skip_reasons=dict(Counter(s.reason for s in res.skipped)),
            patterns=dict(Counter(s.pattern for s in res.rewritten)),
            validation=res.validation.passed,
            validation_notes=list(res.validation.notes),
            max_rel_error=res.validation.max_rel_error,
            onnx=None if report.onnx is None else report.onnx.passed,
            onnx_detail=[export_error] if export_error else None if report.onnx is None else (
                list(report.onnx.failures) + list(report.onnx.skipped)),
            passed=report.passed and export_error is None,
            outcome="onnx-export-failed" if export_error else "ok" if report.passed else "mismatch",
        )
    except fxsurgery.SurgeryError as e:
        record.update(outcome="surgery-error", error=f"{type(e).__name__}: {e}"[:500], passed=False)
    except Exception as e:  # a crash is a finding for the table, not a reason to stop the run
        record.update(outcome="crash", error=f"{type(e).__name__}: {e}"[:500], passed=False,
                      trace=traceback.format_exc()[-2000:])  # fmt: skip
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
        gc.collect()
    record["seconds"] = round(time.perf_counter() - start, 1)
    return record


_TV_INTRO = (
    "Generated by `python -m benchmarks.coverage [--exporter torchscript] [--resume] [models]`, the `{tokens}` rows "
    "by `python -m benchmarks.coverage --token-layout --resume MODELS` (last run: `{command}`) on {machine} "
    "({threads} threads), torch {torch}, random weights (`weights=None`; a zero-initialised Linear, ViT's head, gets "
    "random weights too, else every output is 0), input 1x3x224x224 (299 for inception_v3). Rows `{tokens}` run "
    "Linear -> conv with the opt-in `token_layout=True`. The front end column says which one made the graph "
    "(`frontend=\"auto\"` unless the command asks for one). Each row runs `fxsurgery.check`: rewrite, validation "
    "(example input, one random input, batch 2) and the ONNX cross-check (torch vs onnxruntime, optimizations off "
    "and on, at batch 1 and a second batch size; the ONNX column names the exporter: the smaller models ran with the "
    "dynamo exporter, the rest with the faster TorchScript one)."
)
_HF_INTRO = (
    "Generated by `{command}` on {machine} ({threads} threads), torch {torch}, transformers "
    "{transformers}: the models of `benchmarks/hf_models.py`, built from small configs with random weights (no hub "
    "access) and called as users call them (text models with an `attention_mask` that pads one sequence). Three rows "
    "per model: Linear -> conv, the same with `token_layout=True` (`{tokens}`), and conv -> Linear, each "
    "`fxsurgery.check` with `frontend=\"auto\"` (the front end column says which ran): rewrite, validation "
    "(example inputs, one random input, batch 2 and batch 1, outputs and the state each forward leaves behind) and "
    "the ONNX cross-check (dynamo exporter, onnxruntime)."
)


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def markdown(records: list[dict[str, Any]], command: str, hf: bool = False) -> str:
    ok = [r for r in records if r.get("outcome") == "ok"]
    crashes = [r for r in records if r.get("outcome") == "crash"]
    by_dir = {d: [r for r in records if r["direction"] == d] for d in (*DIRECTIONS.values(), TOKENS)}
    by_dir = {d: rs for d, rs in by_dir.items() if rs}
    intro = _HF_INTRO if hf else _TV_INTRO
    lines = [
        ("# Coverage: HuggingFace models" if hf else "# Coverage: torchvision classification models") + (
            " through torch.export" if records and all(r.get("frontend_asked") == "export" for r in records) else ""),
        "",
        intro.format(command=command, machine=platform.machine(), threads=torch.get_num_threads(),
                     torch=torch.__version__, tokens=TOKENS, transformers=_version("transformers")),
        "",
        f"**Totals:** {len(records)} runs over {len({r['model'] for r in records})} models; {len(ok)} passed everything, "
        f"{len(records) - len(ok) - len(crashes)} failed a check"
        + (f" ({n} of them only because the original model does not export to ONNX)"
           if (n := sum(r.get("outcome") == "onnx-export-failed" for r in records)) else "")
        + f", {len(crashes)} crashed. "
        + "; ".join(
            f"{d}: {sum(r.get('rewritten', 0) for r in rs)} sites rewritten, {sum(r.get('skipped', 0) for r in rs)} skipped"
            for d, rs in by_dir.items()
        )
        + "."
        + (f" Token layout: {sum(r['block_linears'][0] for r in blocks)} of {sum(r['block_linears'][1] for r in blocks)}"
           " Linear layers of the attention and MLP blocks rewritten." if (blocks := [r for r in records if
           r.get("block_linears") and r["direction"] == TOKENS]) else ""),
        "",
        "| model | direction | front end | candidates | rewritten | skipped (reasons) | max rel err | validation | "
        "ONNX/ORT | time (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        if "candidates" not in r:
            lines.append(f"| {r['model']} | {r['direction']} | {r.get('frontend_asked', 'fx')} | | | | | "
                         f"{r['outcome']}: {r.get('error', '')[:120]} | | {r['seconds']} |")  # fmt: skip
            continue
        reasons = "; ".join(f"{n}x {reason}" for reason, n in r["skip_reasons"].items()) or ""
        onnx = {True: "pass", False: "FAIL", None: "not run"}[r["onnx"]]
        if r.get("outcome") == "onnx-export-failed":
            onnx = "original does not export (see below)"
        if r["onnx"] is not None:
            onnx += f" ({r.get('exporter') or 'dynamo'})"
        lines.append(
            f"| {r['model']} | {r['direction']} | {r.get('frontend', 'fx')} | {r['candidates']} | {r['rewritten']} | "
            f"{r['skipped']}"
            f"{' (' + reasons.replace('|', '/') + ')' if reasons else ''} | {r['max_rel_error']:.1e} | "
            f"{'pass' if r['validation'] else 'FAIL'}{' (note)' if r.get('validation_notes') else ''} | {onnx} | "
            f"{r['seconds']} |"
        )
    unexported = [r for r in records if r.get("outcome") == "onnx-export-failed"]
    if unexported:
        lines += ["", "ONNX exports that failed for the original model (the rewrite and its validation still ran):", ""]
        lines += [f"- {r['model']} {r['direction']}: {r['onnx_detail'][0][:300]}" for r in unexported]
    noted = [r for r in records if r.get("validation_notes")]
    if noted:
        lines += ["", "Validation notes:", ""]
        lines += [f"- {r['model']} {r['direction']}: {'; '.join(r['validation_notes'])}" for r in noted]
    return "\n".join(lines) + "\n"


def _progress(record: dict[str, Any]) -> None:
    print(f"{record['model']:22s} {record['direction']:15s} {record.get('outcome'):13s} "
          f"rewritten={record.get('rewritten')} skipped={record.get('skipped')} {record['seconds']}s", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", help="model names (default: all classification models)")
    parser.add_argument("--no-onnx", action="store_true", help="skip the ONNX export and cross-check")
    parser.add_argument("--exporter", choices=("dynamo", "torchscript"), default="dynamo")
    parser.add_argument("--out", default=str(HERE / "coverage"), help="output path without suffix")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--resume", action="store_true", help="keep the records already in OUT.json, run the rest")
    parser.add_argument("--rerun", action="store_true",
                        help="run the records of OUT.json again (same model, direction and exporter), in place; all "
                             "of them, or those of the models named")  # fmt: skip
    parser.add_argument("--direction", choices=("linear_to_conv", TOKENS, "conv_to_linear"),
                        help="with --rerun: only the rows of this direction")
    parser.add_argument("--frontend", choices=("auto", "fx", "export"), default="auto",
                        help="the front end every run asks for (default: auto); --rerun keeps each row's")
    parser.add_argument("--hf", action="store_true",
                        help="the HuggingFace zoo (benchmarks/hf_models.py: small configs, random weights) instead of "
                             "torchvision, all three rows per model; default output benchmarks/coverage-hf")
    parser.add_argument("--token-layout", action="store_true",
                        help=f"run only the {TOKENS} rows (Linear -> conv with token_layout=True)")  # fmt: skip
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    if args.hf:
        from benchmarks.hf_models import ZOO

        every = list(ZOO)
        names = args.models or every
        out = Path(args.out if args.out != str(HERE / "coverage") else HERE / "coverage-hf")
    else:
        every = all_models()
        names = args.models or every
        out = Path(args.out)
    shown = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--resume"]
    command = "python -m benchmarks.coverage" + (" " + " ".join(shown)).rstrip()
    records: list[dict[str, Any]] = []
    if args.resume and out.with_suffix(".json").exists():
        records = json.loads(out.with_suffix(".json").read_text())
    if args.rerun:
        records = json.loads(out.with_suffix(".json").read_text())
        for i, old in enumerate(records):
            if args.models and old["model"] not in args.models or args.token_layout and old["direction"] != TOKENS:
                continue
            if args.direction and old["direction"] != args.direction:
                continue
            to = "conv" if old["direction"].startswith("linear_to_conv") else "linear"
            records[i] = run_one(old["model"], to, onnx=not args.no_onnx, exporter=old.get("exporter") or "dynamo",
                                 tokens=old["direction"] == TOKENS,
                                 frontend=old.get("frontend_asked") or args.frontend, hf=args.hf)  # fmt: skip
            _progress(records[i])
            out.with_suffix(".json").write_text(json.dumps(records, indent=1, default=str))
        names = []
    done = {(r["model"], r["direction"]) for r in records}
    runs = [("conv", True)] if args.token_layout else [(to, False) for to in DIRECTIONS]
    if args.hf:
        runs = [("conv", False), ("conv", True), ("linear", False)]
    for name in names:
        for to, tokens in runs:
            if (name, TOKENS if tokens else DIRECTIONS[to]) in done:
                continue
            record = run_one(name, to, onnx=not args.no_onnx, exporter=args.exporter, tokens=tokens,
                             frontend=args.frontend, hf=args.hf)  # fmt: skip
            records.append(record)
            _progress(record)
            out.with_suffix(".json").write_text(json.dumps(records, indent=1, default=str))
    order = {n: i for i, n in enumerate(every)}
    rank = {"linear_to_conv": 0, TOKENS: 1, "conv_to_linear": 2}
    records.sort(key=lambda r: (order.get(r["model"], len(order)), rank.get(r["direction"], 3)))
    out.with_suffix(".md").write_text(markdown(records, command, hf=args.hf))
    bad = [r for r in records if not r.get("passed")]
    print(f"{len(records) - len(bad)}/{len(records)} runs passed; wrote {out}.json and {out}.md")
    return 0 if not bad else 1


if __name__ == "__main__":
    sys.exit(main())
