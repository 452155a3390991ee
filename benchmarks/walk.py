"""Following ``model`` from ``fxsurgery.check`` through the code (the measure of docs/architecture.md): every
fxsurgery function a call of ``check`` enters holding the user's model, or a module made from it (a working copy,
the traced or rewritten graph: a module whose parameters share the model's storage), is a *stop*; a stop whose
module belongs to an earlier stage of the pipeline than the stop that called it is a *climb back up* (the data
flowing back to a stage it already left). Stages, in the order the data flows: the public face (``api``), the
pipeline, capture, plan (rules, planners), rewrite (engine), verify, artifacts, runtimes.

Run: ``python -m benchmarks.walk [--to conv|linear|auto]`` (the demo model, no ONNX files kept); prints the stops,
the files and the climbs.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

import fxsurgery
from fxsurgery.models import demo_model

PACKAGE = Path(fxsurgery.__file__).resolve().parent
STAGES = ["api", "pipeline", "capture", "plan", "rules", "engine", "verify", "artifacts", "runtimes"]
RANK = {"api": 0, "pipeline": 1, "capture": 2, "plan": 3, "rules": 3, "engine": 4, "verify": 5, "artifacts": 6,
        "runtimes": 7}  # fmt: skip
#: Modules of the last layout, by the stage they belonged to (so that an older checkout can be walked the same way).
OLD = {"surgery": "pipeline", "auto": "plan", "targets": "plan", "tracing": "capture", "programs": "capture",
       "reference": "verify", "passes": "engine", "layers": "engine", "weights": "engine", "checkpoint": "artifacts",
       "convert": "artifacts", "report_html": "artifacts", "timing": "runtimes", "benchmark": "runtimes"}  # fmt: skip


def stage_of(path: str) -> str | None:
    rel = Path(path).resolve().relative_to(PACKAGE).parts
    head = rel[0].removesuffix(".py")
    if rel[:2] in (("verify", "runners.py"), ("verify", "census.py"), ("verify", "ort.py"), ("verify", "coreml.py")):
        return "runtimes"
    if rel[:2] == ("verify", "onnx_export.py"):
        return "artifacts"
    if head in RANK:
        return head
    return OLD.get(head)  # errors, options, report, models, _runtime: no stage


def walk(to: str) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    model, x = demo_model(), torch.randn(2, 3, 32, 32)
    stops: list[tuple[str, str]] = []  # (file, function)
    climbs: list[tuple[str, str]] = []
    stack: list[str | None] = []  # per frame holding the model: its stage

    storage = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def made_from_model(v) -> bool:
        if v is model:
            return True
        if not isinstance(v, torch.nn.Module):
            return False
        return any(p.untyped_storage().data_ptr() in storage for p in v.parameters())

    def holds(frame) -> bool:
        return any(made_from_model(v) for v in frame.f_locals.values())

    def profile(frame, event, arg):
        path = frame.f_code.co_filename
        inside = path.startswith(str(PACKAGE))
        if event == "call" and inside and holds(frame):
            stage = stage_of(path)
            where = f"{Path(path).resolve().relative_to(PACKAGE)}"
            if stack and stack[-1] is not None and stage is not None and RANK[stage] < RANK[stack[-1]]:
                climbs.append((f"{stack[-1]} -> {stage}", f"{where}:{frame.f_code.co_name}"))
            stops.append((where, frame.f_code.co_name))
            stack.append(stage if stage is not None else (stack[-1] if stack else None))
            frame_ids.append(id(frame))
        elif event == "return" and frame_ids and id(frame) == frame_ids[-1]:
            frame_ids.pop()
            stack.pop()

    frame_ids: list[int] = []
    with tempfile.TemporaryDirectory() as tmp:
        sys.setprofile(profile)
        try:
            fxsurgery.check(model, x, to, tmp)
        finally:
            sys.setprofile(None)
    return stops, climbs


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.walk")
    parser.add_argument("--to", default="conv")
    parser.add_argument("-v", action="store_true", help="list every stop")
    args = parser.parse_args()
    stops, climbs = walk(args.to)
    distinct = list(dict.fromkeys(stops))
    files = {f for f, _ in distinct}
    if args.v:
        for f, fn in distinct:
            print(f"  {f}:{fn}")
    kinds = list(dict.fromkeys(climbs))
    print(f"to={args.to}: {len(distinct)} stops in {len(files)} files, {len(kinds)} climbs back up")
    for kind, where in kinds:
        print(f"  climb {kind}: {where}")


if __name__ == "__main__":
    main()
