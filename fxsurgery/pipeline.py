"""The plain pass: trace, rewrite with one rule set, validate, and name the culprits of a mismatch.

Where ``torch.fx`` cannot trace the whole model, the pass descends: a submodule that fails to trace becomes a leaf of
the graph and is itself rewritten the same way, with the inputs it receives on the example inputs; if the root's own
forward cannot be traced, its children are rewritten in a copy of the root. The user's model, its buffers and the
example inputs are never modified.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from fxsurgery.artifacts.checkpoint import merge_layouts, record_module_layouts
from fxsurgery.capture import (
    batch_is_dynamic,
    capture_submodule_inputs,
    check_devices,
    check_names,
    eval_copy,
    export_model,
    inert_hook,
    prepare_model,
    propagate_shapes,
    raise_program,
    refuse_meta,
    trace,
    unwrap,
    working_copy,
)
from fxsurgery.engine.nodes import CONV_TYPES
from fxsurgery.engine.rewriter import Rewriter
from fxsurgery.engine.rule import RuleSet
from fxsurgery.errors import SurgeryError, TraceError, ValidationError
from fxsurgery.options import LeafSpec, Options
from fxsurgery.plan.targets import target_notes, target_skips
from fxsurgery.report import Site, SurgeryResult
from fxsurgery.rules import rule_set
from fxsurgery.verify.policy import STRUCTURE
from fxsurgery.verify.reference import (
    CAPTURED_NOTE,
    batch_one_admitted,
    check_mode_for_validation,
    validation_reference,
)
from fxsurgery.verify.validation import validate

__all__ = ["run_pass"]

log = logging.getLogger(__name__)

_MAX_DEPTH = 8
_MAX_AUTO_LEAVES = 64


@dataclass(frozen=True)
class _Job:
    """What every level of the descent shares: the rules, and the leaf and exclude lists of the current module."""

    rules: RuleSet
    leaf_modules: LeafSpec
    exclude: Sequence[str]
    depth: int = 0
    tied: Mapping[str, str] = field(default_factory=dict)  # parameter -> the module outside that shares it
    frontend: str = "fx"  # "fx" or "export"
    program: Any = None  # the ExportedProgram the caller gave instead of a model
    skip: Mapping[str, str] = field(default_factory=dict)  # pattern -> why a deployment target leaves it alone

    def below(self, name: str, source: nn.Module) -> _Job:
        """The job for submodule ``name`` of ``source``: its names relative to it, and the parameters it shares
        with modules outside it (GPT-2's ``lm_head`` and ``wte``), which a rewrite inside must not untie."""
        prefix = f"{name}."
        exclude = [e.removeprefix(prefix) for e in self.exclude if e.startswith(prefix)]
        leaves = [x.removeprefix(prefix) if isinstance(x, str) else x for x in self.leaf_modules
                  if not isinstance(x, str) or x.startswith(prefix)]  # fmt: skip
        owners: dict[int, list[str]] = {}
        for pname, p in source.named_parameters(remove_duplicate=False):
            owners.setdefault(id(p), []).append(pname)
        tied = {k.removeprefix(prefix): v for k, v in self.tied.items() if k.startswith(prefix)}
        for names in owners.values():
            inside, outside = [n for n in names if n.startswith(prefix)], [n for n in names if not n.startswith(prefix)]
            tied.update({n.removeprefix(prefix): outside[0].rsplit(".", 1)[0] for n in inside if outside})
        return _Job(self.rules, leaves, exclude, self.depth + 1, tied, self.frontend, self.program, self.skip)


def run_pass(model: nn.Module, inputs: tuple[torch.Tensor, ...], direction: str, options: Options,
             program: Any = None) -> SurgeryResult:  # fmt: skip
    """One direction (``"linear_to_conv"`` or ``"conv_to_linear"``) over ``model``: see the module docstring."""
    rules = rule_set(direction, options)
    wrappers = unwrap(model)[1] if isinstance(model, nn.Module) else []
    model = prepare_model(model)
    if options.validate:
        refuse_meta(model, inputs, "validation")
    module_names = [n for n, _ in model.named_modules() if n]
    check_names("leaf_modules entry", [x for x in options.leaf_modules if isinstance(x, str)], module_names)
    log.info("tracing %s", type(model).__name__)
    job = _Job(rules, options.leaf_modules, options.exclude, program=program, skip=target_skips(options.target))
    job, gm, sites, notes = _front_end(model, inputs, job, options.frontend)
    captured = gm.meta.pop("captured", None) if isinstance(gm, fx.GraphModule) else None  # the export, unrewritten
    check_names("exclude entry", options.exclude, [*module_names, *(s.name for s in sites)])
    notes = [*target_notes(options.target, options.batch_layout, direction), *notes]
    result = SurgeryResult(gm, sites, None, direction, (*wrappers, *notes), frontend=job.frontend)
    if not options.validate:
        return result
    check_mode_for_validation(model, gm)
    log.info("validating %d rewritten sites", len(result.rewritten))
    reference = validation_reference(model, captured, inputs, options, result)
    original = eval_copy(reference, options.precision)
    check = validate(reference, gm, inputs, num_random=options.num_random, precision=options.precision,
                     rtol=options.rtol, seed=options.seed, original_copy=original)  # fmt: skip
    if reference is not model:
        check = dataclasses.replace(check, notes=(*check.notes, CAPTURED_NOTE))
    result = dataclasses.replace(result, validation=check)
    if not check:
        if STRUCTURE in check.failure:  # not a site's doing: the graph as a whole returns something else
            raise ValidationError(f"validation failed: {check.failure}; the rewritten graph returns another "
                                  "structure than the model (no site is responsible): please report the model",
                                  result=result)  # fmt: skip
        if _error_with(model, inputs, job, result.rewritten, [], original, options) is not None:
            other = "fx" if job.frontend == "export" else "export"
            raise ValidationError(f"validation failed: {check.failure}; the graph {job.frontend} made fails with no "
                                  f"site rewritten (no site is responsible): try frontend={other!r}, and please "
                                  "report the model", result=result)  # fmt: skip
        culprits = _find_culprits(model, inputs, job, result, original, options)
        named = ", ".join(f"{s.name} ({s.pattern})" for s in culprits) or "the combination of rewritten sites"
        raise ValidationError(f"validation failed: {check.failure}; responsible: {named}. Exclude the site with "
                              "exclude=[...] and report the model", result=result,
                              sites=tuple(s.name for s in culprits))  # fmt: skip
    return result


def _apply(traced: fx.GraphModule, inputs: tuple[torch.Tensor, ...], job: _Job,
           keep: bool = True) -> tuple[fx.GraphModule, list[Site]]:  # fmt: skip
    """The rule set over a working copy of ``traced`` (parameters shared, graph its own), or over ``traced`` itself
    where the caller does not ``keep`` it (a trace of a copy, used once)."""
    gm = working_copy(traced) if keep else traced
    gm.training = traced.training  # the root's flag only: every submodule keeps its own
    try:
        propagate_shapes(gm, inputs)
    except TraceError:
        check_devices(gm, inputs)  # the likeliest cause, said plainly
        raise
    try:
        rw = Rewriter(gm, job.rules, job.exclude, job.tied, job.skip)
        sites = rw.run()
    except SurgeryError:
        raise
    except Exception as e:
        raise SurgeryError(f"internal error while rewriting ({type(e).__name__}: {e}); please report it") from e
    record_module_layouts(gm, rw.modules, rw.new_modules)
    return gm, sites


def _front_end(model: nn.Module, inputs: tuple[torch.Tensor, ...], job: _Job,
               frontend: str) -> tuple[_Job, nn.Module, list[Site], list[str]]:  # fmt: skip
    """Rewrite through the chosen front end; ``"auto"``: fx, and where fx does not trace the whole model, also
    ``torch.export``, keeping whichever rewrites more sites, then whichever sees more candidates, then fx. The notes
    say which ran and why."""
    if frontend != "auto":
        job = dataclasses.replace(job, frontend=frontend)
        return _said(job, _rewrite_structure(model, inputs, job), f"front end: {frontend} (as asked)")
    fx_out: _Out | None = None
    try:
        fx_out = _rewrite_structure(model, inputs, job)
    except TraceError as e:
        fx_error = e
    if fx_out is not None and not any(p in n for p in _PARTIAL for n in fx_out[2]):
        return _said(job, fx_out, "front end: fx (torch.fx traced the whole model)")
    ex_job = dataclasses.replace(job, frontend="export")
    try:
        ex_out = _rewrite_structure(model, inputs, ex_job)
    except SurgeryError as e:
        if fx_out is None:
            raise fx_error from e
        return _said(job, fx_out, f"front end: fx (torch.fx did not trace the whole model; torch.export failed "
                                  f"too: {_cause(e)})")  # fmt: skip
    if fx_out is None:
        return _said(ex_job, ex_out, f"front end: export (torch.fx cannot trace the model: {_cause(fx_error)})")
    # more sites rewritten wins; then more candidates seen (listed with their reasons); then fx
    n_ex, n_fx = (sum(s.rewritten for s in out[1]) for out in (ex_out, fx_out))
    if (n_ex, len(ex_out[1])) > (n_fx, len(fx_out[1])):
        return _said(ex_job, ex_out, f"front end: export (torch.fx did not trace the whole model; torch.export "
                                     f"rewrites {n_ex} of {len(ex_out[1])} candidates, fx {n_fx} of "
                                     f"{len(fx_out[1])})")  # fmt: skip
    return _said(job, fx_out, f"front end: fx (torch.fx did not trace the whole model, but torch.export does no "
                              f"better: {n_ex} of {len(ex_out[1])} candidates rewritten, fx {n_fx} of "
                              f"{len(fx_out[1])})")  # fmt: skip


_Out = tuple[nn.Module, list[Site], list[str]]


def _said(job: _Job, out: _Out, note: str) -> tuple[_Job, nn.Module, list[Site], list[str]]:
    return job, out[0], out[1], [note, *out[2]]


#: The notes of a partial fx trace (a submodule or the root left as code).
_PARTIAL = ("cannot be traced", "left untouched")


def _rewrite_exported(model: nn.Module, inputs: tuple[torch.Tensor, ...],
                      job: _Job) -> tuple[nn.Module, list[Site], list[str]]:  # fmt: skip
    """The ``torch.export`` front end: export a copy, raise its graph back to module calls, rewrite."""
    hooked = [name or "the root" for name, m in model.named_modules() for d in _HOOK_DICTS
              if any(not inert_hook(h) for h in getattr(m, d, {}).values())]  # fmt: skip
    if hooked and job.program is None:  # a given program's module has the export's own input-checking hook
        raise TraceError(f"torch.export runs forward hooks into the graph ({hooked[0]} has hooks), where a rewrite "
                         "would run them twice; use frontend='fx', which keeps hooked modules as calls",
                         cause="forward hooks")  # fmt: skip
    program = job.program or export_model(working_copy(model), inputs)
    batch_one = job.program is not None or batch_one_admitted(model, program, inputs)
    if not batch_one and inputs[0].shape[0] == 1:  # traced at 2 for a batch-1 example, and wrong at 1: export at 1
        program = export_model(working_copy(model), inputs, tuple(None for _ in inputs))
    try:
        traced = raise_program(program, working_copy(model), batch_one)
    except SurgeryError:
        raise
    except Exception as e:
        raise SurgeryError(f"internal error while raising the exported graph ({type(e).__name__}: {e}); please "
                           "report it, and use frontend='fx' meanwhile") from e  # fmt: skip
    traced.training = model.training  # the root's flag only: every submodule keeps its own
    gm, sites = _apply(traced, inputs, job)
    gm.meta["captured"] = traced
    notes = [] if batch_is_dynamic(program) else ["torch.export fixed the batch size of the example inputs: the "
                                                  "rewritten graph runs at that batch only"]  # fmt: skip
    if not batch_one and batch_is_dynamic(program):
        notes.append(f"torch.export traced {type(model).__name__} for batch sizes of 2 and more, and at batch 1 "
                     "the model computes something else (its forward branches on the batch size): the rewritten "
                     "graph refuses batches 0 and 1 with a clear error; rewrite with a batch-1 example for "
                     "batch 1")  # fmt: skip
    return gm, sites, notes


def _rewrite_structure(model: nn.Module, inputs: tuple[torch.Tensor, ...], job: _Job) -> tuple[nn.Module, list[Site],
                                                                                               list[str]]:  # fmt: skip
    """Trace and rewrite ``model``; where fx cannot trace, rewrite inside the largest submodules that do trace.
    Returns the new module, its sites and notes saying what was left untouched."""
    if job.frontend == "export":
        return _rewrite_exported(model, inputs, job)
    auto = _hooked_containers(model)
    notes = [f"{name} has forward hooks: kept as a called module, so that they run and see what they saw before, "
             "and rewritten inside" for name in auto]  # fmt: skip
    while True:
        try:
            # trace a copy: tracing runs the model's Python code, which may write to its attributes
            traced = trace(working_copy(model), (*job.leaf_modules, *auto), n_inputs=len(inputs))
            break
        except TraceError as e:
            where = e.module or ""
            if job.depth >= _MAX_DEPTH:
                raise
            if where and where not in auto and len(auto) < _MAX_AUTO_LEAVES:
                auto.append(where)
                notes.append(f"{where} ({type(model.get_submodule(where)).__name__}) cannot be traced "
                             f"({_cause(e)}); kept as a leaf and rewritten inside")  # fmt: skip
                continue
            if where or not list(model.children()):
                raise
            return _descend_root(model, inputs, job, e)
    gm, sites = _apply(traced, inputs, job, keep=False)  # traced from a working copy, used only here
    if auto:
        _rewrite_children(gm, model, auto, inputs, job, sites, notes)
    return gm, sites, notes


def _hooked_containers(model: nn.Module) -> list[str]:
    """The outermost submodules with forward hooks that hold layers of their own."""
    out: list[str] = []
    for name, m in model.named_modules():
        hooked = m._forward_hooks or m._forward_pre_hooks
        if name and hooked and list(m.children()) and not any(name.startswith(f"{o}.") for o in out):
            out.append(name)
    return out


def _descend_root(model: nn.Module, inputs: tuple[torch.Tensor, ...], job: _Job,
                  error: TraceError) -> tuple[nn.Module, list[Site], list[str]]:  # fmt: skip
    root = working_copy(model)
    notes = [f"the forward of {type(model).__name__} cannot be traced ({_cause(error)}); its own code is left as "
             "it is and its submodules are rewritten one by one"]  # fmt: skip
    sites: list[Site] = []
    names = [name for name, _ in model.named_children()]
    if not _rewrite_children(root, model, names, inputs, job, sites, notes) and not sites:
        raise error  # no child could be rewritten or listed either: the original error says the most
    return root, sites, notes


def _rewrite_children(target: nn.Module, source: nn.Module, names: Sequence[str], inputs: tuple[torch.Tensor, ...],
                      job: _Job, sites: list[Site], notes: list[str]) -> int:  # fmt: skip
    """Rewrite each submodule ``names`` of ``target`` (a copy of ``source``) with the inputs it gets in ``source``,
    adding to ``sites`` and ``notes``; returns how many were rewritten (the others are noted as untouched)."""
    captured, skipped = capture_submodule_inputs(source, inputs, names)
    notes += [f"{name} left untouched: {why}" for name, why in skipped.items()]
    done = 0
    for name, sub_inputs in captured.items():
        child = target.get_submodule(name)
        bare = not list(child.children())  # a layer traced on its own: its one site is the layer itself
        if bare and name in job.exclude:
            sites += _bare_candidate(name, child, sub_inputs, job, "excluded by the caller")
            continue
        try:
            new, sub_sites, sub_notes = _rewrite_structure(child, sub_inputs, job.below(name, source))
        except SurgeryError as e:
            notes.append(f"{name} left untouched: {_cause(e)}")
            continue
        done += 1
        single = bare and len(sub_sites) == 1
        sites += [dataclasses.replace(s, name=name if single else f"{name}.{s.name}") for s in sub_sites]
        sites += _bare_candidate(name, child, sub_inputs, job) if not sub_sites else []
        notes += [f"in {name}: {n}" for n in sub_notes]
        if any(s.rewritten for s in sub_sites):  # else the child stays as it was: its class, its attributes
            _keep_attributes(new, child)
            target.set_submodule(name, new)
            merge_layouts(target, f"{name}.", new)
    return done


_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
               "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks")  # fmt: skip


def _keep_attributes(new: nn.Module, old: nn.Module) -> None:
    """The replacement of a child keeps its hooks (they run on its calls as before) and its plain attributes (a
    conv's ``stride``, read by its parent's code)."""
    for key, value in vars(old).items():
        if not key.startswith("_") and key not in vars(new) and not isinstance(value, (nn.Module, torch.Tensor)):
            setattr(new, key, value)
    for key in _HOOK_DICTS:
        if getattr(old, key, None):
            setattr(new, key, type(getattr(old, key))(getattr(old, key)))


def _bare_candidate(name: str, child: nn.Module, inputs: tuple[torch.Tensor, ...], job: _Job,
                    why: str | None = None) -> list[Site]:  # fmt: skip
    """A Linear or pointwise/full-extent conv called directly by untraceable code: listed, with why it stays."""
    x = inputs[0] if inputs else None
    kernel: tuple[int, ...] = tuple(child.kernel_size) if isinstance(child, CONV_TYPES) else ()  # type: ignore[arg-type]
    linear = job.rules.direction == "linear_to_conv" and isinstance(child, nn.Linear)
    conv = job.rules.direction == "conv_to_linear" and bool(kernel) and x is not None and (
        all(k == 1 for k in kernel) or tuple(x.shape[2:]) == tuple(kernel))  # fmt: skip
    if not (linear or conv):
        return []
    why = why or ("called directly by code that cannot be traced: what it reads and where its output goes are not "
                  "visible to the rewrite; make that code traceable or move the layer into a traceable submodule")
    pattern = "flatten->linear" if linear else "conv1x1" if all(k == 1 for k in kernel) else "conv-full-extent"
    return [Site(name, pattern, "skipped", why)]


def _cause(e: BaseException) -> str:
    return e.cause if isinstance(e, TraceError) else str(e)


def _error_with(model: nn.Module, inputs: tuple[torch.Tensor, ...], job: _Job, rewritten: list[Site],
                group: list[Site], original: nn.Module, options: Options) -> float | None:  # fmt: skip
    """The validation error with only the sites of ``group`` rewritten (None: it passes)."""
    others = [s.name for s in rewritten if s not in group]
    gm, _, _ = _rewrite_structure(model, inputs, dataclasses.replace(job, exclude=[*job.exclude, *others]))
    check = validate(original, gm, inputs, num_random=0, precision=options.precision, rtol=options.rtol,
                     seed=options.seed, original_copy=original)  # fmt: skip
    return None if check else check.max_rel_error


def _find_culprits(model: nn.Module, inputs: tuple[torch.Tensor, ...], job: _Job, result: SurgeryResult,
                   original: nn.Module, options: Options) -> list[Site]:  # fmt: skip
    """The sites whose rewrite alone fails validation, worst first, by halving: rewrite half of a failing group,
    keep the halves that fail, down to single sites (about 2 log2(n) rewrites for one culprit among n, instead of n).
    Empty when no single site fails alone (an interaction between sites)."""
    rewritten = result.rewritten
    if len(rewritten) <= 1:
        return rewritten

    def error_of(group: list[Site]) -> float | None:
        return _error_with(model, inputs, job, rewritten, group, original, options)

    def search(group: list[Site], error: float) -> list[tuple[float, Site]]:
        if len(group) == 1:
            return [(error, group[0])]
        found = []
        for part in (group[: len(group) // 2], group[len(group) // 2 :]):
            part_error = error_of(part)
            if part_error is not None:
                found += search(part, part_error)
        return found

    assert result.validation is not None
    scored = search(rewritten, result.validation.max_rel_error)
    scored.sort(key=lambda p: -p[0])
    return [s for _, s in scored]
