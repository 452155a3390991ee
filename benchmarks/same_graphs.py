"""Whether a change to shape propagation changed any rewrite: every torchvision classification model (with
``--hf``: the HuggingFace zoo of ``benchmarks/hf_models.py``, also with the token layout), both directions,
rewritten (``validate=False``) with the meta-device shape propagation and again with fake tensors only (the
propagation before it); the generated code and every site's outcome must be the same.

Run: ``python -m benchmarks.same_graphs [--frontend fx|export] [--hf] [--tokens]``; writes ``/tmp/same_graphs_<frontend>.json``.
Last run (after the meta-device propagation): see the note at the top of ``benchmarks/coverage.md``.

Whether a change to the code changed any rewrite: ``--dump FILE`` writes each rewrite (the generated code and every
site's outcome) as the checkout makes it, with the default propagation only; run it on the old checkout and on the new
one (``git worktree add /tmp/old HEAD~1``, then ``cd /tmp/old && python -m benchmarks.same_graphs --dump old.json``),
and ``--against old.json`` compares the new checkout's rewrites with them.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
import warnings
from pathlib import Path
from typing import Any

import torch

import fxsurgery
from fxsurgery.capture import shapes


def _fake_only(gm: Any, inputs: Any) -> None:
    raise TypeError("meta propagation off: fake tensors")


def _models(hf: bool) -> list[tuple[str, Any, Any]]:
    if hf:
        from benchmarks.hf_models import ZOO, build

        return [(name, lambda n=name: build(n)[:2], None) for name in ZOO]
    import torchvision

    out = []
    for name in torchvision.models.list_models(module=torchvision.models):
        size = 299 if name == "inception_v3" else 224
        out.append((name, lambda n=name: torchvision.models.get_model(n, weights=None), (1, 3, size, size)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.same_graphs")
    parser.add_argument("--frontend", default="fx", choices=("fx", "export", "auto"))
    parser.add_argument("--hf", action="store_true")
    parser.add_argument("--tokens", action="store_true",
                        help="only the token-layout rows of benchmarks/coverage.json (linear_to_conv, token_layout=True)")
    parser.add_argument("--dump", help="write the checkout's rewrites to this JSON file (default propagation only)")
    parser.add_argument("--against", help="compare the checkout's rewrites with a file --dump wrote")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    meta = shapes._meta_prop
    once = bool(args.dump or args.against)
    against = json.loads(Path(args.against).read_text()) if args.against else None
    dumped: dict[str, Any] = {}
    rows = []
    models = _models(args.hf)
    if args.tokens:
        with open("benchmarks/coverage.json") as f:
            records = json.load(f)
        rows_run = records["records"] if isinstance(records, dict) else records
        token_rows = {r["model"] for r in rows_run if r["direction"].endswith("+tokens")}
        models = [m for m in models if m[0] in token_rows]
    for name, make, shape in models:
        torch.manual_seed(0)
        built = make()
        model, x = (built, torch.randn(shape)) if shape else built  # the HF zoo builds (model, inputs)
        plain = () if args.tokens else ("linear_to_conv", "conv_to_linear")
        for direction in (*plain, *(("linear_to_conv+tokens",) if args.hf or args.tokens else ())):
            start, seen = time.perf_counter(), []
            for prop in (meta,) if once else (meta, _fake_only):
                shapes._meta_prop = prop  # type: ignore[assignment]
                res = fxsurgery.rewrite(model.eval(), x, direction.removesuffix("+tokens"), validate=False,
                                        frontend=args.frontend, token_layout=direction.endswith("+tokens"))
                seen.append([getattr(res.module, "code", repr(res.module)),
                             [[s.name, s.status, s.reason] for s in res.sites]])  # fmt: skip
            shapes._meta_prop = meta
            dumped[f"{name} {direction}"] = seen[0]
            if once:  # the other side is the dump of another checkout (or nothing yet)
                seen.append(against.get(f"{name} {direction}") if against is not None else seen[0])
            rows.append({"model": name, "direction": direction, "same": seen[0] == seen[1],
                         "rewritten": sum(s[1] == "rewritten" for s in seen[0][1])})  # fmt: skip
            print(name, direction, "same" if rows[-1]["same"] else "DIFFERENT", rows[-1]["rewritten"],
                  f"{time.perf_counter() - start:.1f}s", flush=True)  # fmt: skip
        del model
        gc.collect()
    if args.dump:
        with open(args.dump, "w") as f:
            json.dump(dumped, f)
    tag = f"{args.frontend}{'_hf' if args.hf else ''}{'_tokens' if args.tokens else ''}"
    with open(f"/tmp/same_graphs_{tag}.json", "w") as f:
        json.dump(rows, f)
    print(f"the same: {sum(r['same'] for r in rows)}/{len(rows)}")


if __name__ == "__main__":
    main()
