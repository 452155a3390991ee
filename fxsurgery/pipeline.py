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
    HOOK_DICTS,
    batch_is_dynamic,
    capture_submodule_inputs,
    check_devices,
    check_names,
    export_model,
    hooked_containers,
    inert_hook,
    keep_attributes,
    prepare_model,
    propagate_shapes,
    raise_program,
    refuse_meta,
    trace,
    unwrap,
    working_copy,
)
from fxsurgery.capture.frontends import choose_front_end
from fxsurgery.capture.layers import plain_linears
from fxsurgery.engine import subgraph
from fxsurgery.engine.passes import PASSES, transform
from fxsurgery.engine.rewriter import rewrite_alike
from fxsurgery.engine.rule import RuleSet
from fxsurgery.errors import InputError, SurgeryError, TraceError, ValidationError, cause_of, reported_as_internal
from fxsurgery.options import LeafSpec, Options
from fxsurgery.plan.auto import DIRECTIONS, plan_auto
from fxsurgery.plan.targets import target_notes, target_skips
from fxsurgery.report import Site, SurgeryResult
from fxsurgery.rules import bare_candidate, rule_set, unlisted_linears
from fxsurgery.rules.linear_to_conv import experts as moe
from fxsurgery.verify.culprits import failure_of
from fxsurgery.verify.policy import QUANTIZED_RTOL
from fxsurgery.verify.reference import batch_one_admitted, validated
from fxsurgery.verify.validation import identical_values, validate

__all__ = ["run_pass", "run_auto", "run_quantized"]

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
    path: str = ""  # the module's place in the model given ("" the root, else "encoder.layer.0.")
    # (front end, path) -> what capturing that module gave, taken once per run: the culprit search rewrites again
    # with sites left out, from the same captured graphs (tracing does not depend on the sites)
    captured: dict[tuple[str, str], Any] = field(default_factory=dict, compare=False)
    # submodule path (from the root) -> why it was left untouched: the Linears inside are listed with that reason
    untouched: dict[str, str] = field(default_factory=dict, compare=False)

    def below(self, name: str, source: nn.Module) -> _Job:
        """The job for submodule ``name`` of ``source``: its names relative to it, and the parameters it shares
        with modules outside it (GPT-2's ``lm_head`` and ``wte``), which a rewrite inside must not untie."""
        prefix = f"{name}."
        exclude = [e.removeprefix(prefix) for e in self.exclude if e.startswith(prefix)]
        leaves = [
            x.removeprefix(prefix) if isinstance(x, str) else x
            for x in self.leaf_modules
            if not isinstance(x, str) or x.startswith(prefix)
        ]
        owners: dict[int, list[str]] = {}
        for pname, p in source.named_parameters(remove_duplicate=False):
            owners.setdefault(id(p), []).append(pname)
        tied = {k.removeprefix(prefix): v for k, v in self.tied.items() if k.startswith(prefix)}
        for names in owners.values():
            inside, outside = [n for n in names if n.startswith(prefix)], [n for n in names if not n.startswith(prefix)]
            tied.update({n.removeprefix(prefix): outside[0].rsplit(".", 1)[0] for n in inside if outside})
        return dataclasses.replace(
            self, leaf_modules=leaves, exclude=exclude, depth=self.depth + 1, tied=tied, path=f"{self.path}{prefix}"
        )


def run_pass(
    model: nn.Module, inputs: tuple[torch.Tensor, ...], direction: str, options: Options, program: Any = None
) -> SurgeryResult:
    """One direction (``"linear_to_conv"`` or ``"conv_to_linear"``) over ``model``: see the module docstring."""
    rules = rule_set(direction, options)
    wrappers = unwrap(model)[1] if isinstance(model, nn.Module) else []
    model = prepare_model(model)
    if options.validate:
        refuse_meta(model, inputs, "validation")
    structure, subclasses, plain_notes = plain_linears(model)  # the user's model stays the reference
    module_names = [n for n, _ in model.named_modules() if n]
    check_names("leaf_modules entry", [x for x in options.leaf_modules if isinstance(x, str)], module_names)
    log.info("tracing %s", type(model).__name__)
    job = _Job(rules, options.leaf_modules, options.exclude, program=program, skip=target_skips(options.target))
    dense, expert_sites, expert_notes = moe.dense_experts(structure, direction, options, job.skip)  # before capture
    untouched: dict[str, dict[str, str]] = {}  # per front end tried
    frontend, (gm, sites, notes) = choose_front_end(
        options.frontend,
        lambda name: _rewrite_structure(
            dense, inputs, dataclasses.replace(job, frontend=name, untouched=untouched.setdefault(name, {}))
        ),
    )
    job = dataclasses.replace(job, frontend=frontend, untouched=untouched.get(frontend, {}))
    if direction == "linear_to_conv":
        sites = [*sites, *expert_sites]
        sites += unlisted_linears(model, gm, sites, {**job.untouched, **subclasses}, options.token_layout)
    captured = gm.meta.pop("captured", None) if isinstance(gm, fx.GraphModule) else None  # the export, unrewritten
    check_names("exclude entry", options.exclude, [*module_names, *(s.name for s in sites)])
    notes = [*target_notes(options.target, options.batch_layout, direction), *plain_notes, *expert_notes, *notes]
    result = SurgeryResult(gm, sites, None, direction, (*wrappers, *notes), frontend=job.frontend)
    if not options.validate:
        return result
    result, original = validated(model, captured, inputs, options, result)
    if not result.validation:
        raise failure_of(
            result,
            job.frontend,
            lambda group: _error_with(structure, inputs, job, result.rewritten, group, original, options),
        )
    return result


def run_auto(model: nn.Module, inputs: tuple[torch.Tensor, ...], options: Options) -> SurgeryResult:
    """``to="auto"``: both passes list the sites, the planner (:mod:`fxsurgery.plan.auto`) keeps per site the form
    that measured faster and composes the model, which is validated here as any pass's result."""
    if len(inputs) != 1:
        raise InputError("to='auto' times models on one input tensor; this model takes several")
    if options.validate:
        refuse_meta(model, inputs, "validation")
    plain = options.without_validation()
    full = {d: run_pass(model, inputs, d, plain) for d in DIRECTIONS}
    result = plan_auto(model, inputs, full, plain, run_pass)
    if not options.validate:
        return result
    result, _ = validated(model, None, inputs, options, result)
    check = result.validation
    if check is not None and not check:  # two passes composed: the culprit search of one pass does not apply
        raise ValidationError(f"validation failed: {check.failure}", result=result)
    return result


def run_quantized(model: Any, inputs: tuple[torch.Tensor, ...], direction: str, options: Options) -> SurgeryResult:
    """A quantized graph (an ExportedProgram or a ``convert_pt2e`` GraphModule): rewritten as the exported graph it
    is, by the ATen rules, which keep every int8 island whole (:mod:`fxsurgery.rules.aten.quantized`); validated in
    native precision against the quantized model. Given an ExportedProgram, ``result.program`` is the rewritten one."""
    given = model if isinstance(model, torch.export.ExportedProgram) else None
    program = given if given is not None else export_model(working_copy(model).eval(), inputs)
    rewriter = PASSES[direction](options.exclude)
    with reported_as_internal():
        new = transform(program, rewriter)
    original = given.module() if given is not None else model
    note = "quantized graph: rewritten as the exported graph it is, every int8 island (dq -> op -> q) kept whole"
    program_out = new if given is not None else None
    result = SurgeryResult(new.module(), rewriter.sites, None, direction, (note,), None, "export", program_out)
    if not options.validate:
        return result
    rtol = options.rtol or QUANTIZED_RTOL
    note += (
        f"; validated in native precision to {rtol:g} of each output's scale (a float sum may round a "
        "requantization the other way); on the example inputs, "
        + identical_values(working_copy(original).eval(), result.module, inputs)
    )
    result = dataclasses.replace(result, notes=(note,))
    result, _ = validated(original, None, inputs, dataclasses.replace(options, precision="native", rtol=rtol), result)
    check = result.validation
    if check is not None and not check:
        raise ValidationError(f"validation failed: {check.failure}", result=result)
    return result


def _apply(traced: fx.GraphModule, inputs: tuple[torch.Tensor, ...], job: _Job) -> tuple[fx.GraphModule, list[Site]]:
    """The rule set over a working copy of ``traced`` (parameters shared, graph its own); ``traced`` stays as is."""

    def fresh() -> fx.GraphModule:
        gm = working_copy(traced)
        gm.training = traced.training  # the root's flag only: every submodule keeps its own
        try:
            propagate_shapes(gm, inputs)
        except TraceError:
            check_devices(gm, inputs)  # the likeliest cause, said plainly
            raise
        return gm

    with reported_as_internal():
        rw = rewrite_alike(fresh, job.rules, job.exclude, job.tied, job.skip)
    record_module_layouts(rw.gm, rw.modules, rw.new_modules)
    return rw.gm, subgraph.with_shapes(rw.sites, rw.gm, inputs)


def _rewrite_exported(
    model: nn.Module, inputs: tuple[torch.Tensor, ...], job: _Job
) -> tuple[nn.Module, list[Site], list[str]]:
    """The ``torch.export`` front end: export a copy, raise its graph back to module calls, rewrite."""
    hooked = [
        name or "the root"
        for name, m in model.named_modules()
        for d in HOOK_DICTS
        if any(not inert_hook(h) for h in getattr(m, d, {}).values())
    ]
    if hooked and job.program is None:  # a given program's module has the export's own input-checking hook
        raise TraceError(
            f"torch.export runs forward hooks into the graph ({hooked[0]} has hooks), where a rewrite "
            "would run them twice; use frontend='fx', which keeps hooked modules as calls",
            cause="forward hooks",
        )
    key = ("export", job.path)
    if key not in job.captured:
        job.captured[key] = _export_and_raise(model, inputs, job)
    traced, notes = job.captured[key]
    gm, sites = _apply(traced, inputs, job)
    gm.meta["captured"] = traced
    return gm, sites, list(notes)


def _export_and_raise(
    model: nn.Module, inputs: tuple[torch.Tensor, ...], job: _Job
) -> tuple[fx.GraphModule, list[str]]:
    """The model's graph as torch.export captures it, raised back to module calls, and the notes on its batch."""
    program = job.program or export_model(working_copy(model), inputs)
    batch_one = job.program is not None or batch_one_admitted(model, program, inputs)
    if not batch_one and inputs[0].shape[0] == 1:  # traced at 2 for a batch-1 example, and wrong at 1: export at 1
        program = export_model(working_copy(model), inputs, tuple(None for _ in inputs))
    with reported_as_internal("raising the exported graph", meanwhile="use frontend='fx'"):
        traced = raise_program(program, working_copy(model), batch_one)
    traced.training = model.training  # the root's flag only: every submodule keeps its own
    notes = (
        []
        if batch_is_dynamic(program)
        else ["torch.export fixed the batch size of the example inputs: the rewritten graph runs at that batch only"]
    )
    if not batch_one and batch_is_dynamic(program):
        notes.append(
            f"torch.export traced {type(model).__name__} for batch sizes of 2 and more, and at batch 1 "
            "the model computes something else (its forward branches on the batch size): the rewritten "
            "graph refuses batches 0 and 1 with a clear error; rewrite with a batch-1 example for "
            "batch 1"
        )
    return traced, notes


def _rewrite_structure(
    model: nn.Module, inputs: tuple[torch.Tensor, ...], job: _Job
) -> tuple[nn.Module, list[Site], list[str]]:
    """Trace and rewrite ``model``; where fx cannot trace, rewrite inside the largest submodules that do trace.
    Returns the new module, its sites and notes saying what was left untouched."""
    if job.frontend == "export":
        return _rewrite_exported(model, inputs, job)
    key = ("fx", job.path)
    if key not in job.captured:
        job.captured[key] = _fx_trace(model, inputs, job)
    traced, auto, notes = job.captured[key]
    if isinstance(traced, TraceError):  # the root's own forward: its children are rewritten one by one
        return _descend_root(model, inputs, job, traced)
    gm, sites = _apply(traced, inputs, job)
    notes = list(notes)
    if auto:
        _rewrite_children(gm, model, auto, inputs, job, sites, notes)
    return gm, sites, notes


def _fx_trace(
    model: nn.Module, inputs: tuple[torch.Tensor, ...], job: _Job
) -> tuple[fx.GraphModule | TraceError, list[str], list[str]]:
    """``model`` traced by torch.fx, with the submodules kept as leaves because they do not trace (or hold hooks)
    and notes saying so; the TraceError in place of the graph where the root's own forward does not trace."""
    auto = hooked_containers(model)
    notes = [
        f"{name} has forward hooks: kept as a called module, so that they run and see what they saw before, "
        "and rewritten inside"
        for name in auto
    ]
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
                notes.append(
                    f"{where} ({type(model.get_submodule(where)).__name__}) cannot be traced "
                    f"({cause_of(e)}); kept as a leaf and rewritten inside"
                )
                continue
            if where or not list(model.children()):
                raise
            return e, auto, notes
    return traced, auto, notes


def _descend_root(
    model: nn.Module, inputs: tuple[torch.Tensor, ...], job: _Job, error: TraceError
) -> tuple[nn.Module, list[Site], list[str]]:
    root = working_copy(model)
    notes = [
        f"the forward of {type(model).__name__} cannot be traced ({cause_of(error)}); its own code is left as "
        "it is and its submodules are rewritten one by one"
    ]
    sites: list[Site] = []
    names = [name for name, _ in model.named_children()]
    if not _rewrite_children(root, model, names, inputs, job, sites, notes) and not sites:
        raise error  # no child could be rewritten or listed either: the original error says the most
    return root, sites, notes


def _rewrite_children(
    target: nn.Module,
    source: nn.Module,
    names: Sequence[str],
    inputs: tuple[torch.Tensor, ...],
    job: _Job,
    sites: list[Site],
    notes: list[str],
) -> int:
    """Rewrite each submodule ``names`` of ``target`` (a copy of ``source``) with the inputs it gets in ``source``,
    adding to ``sites`` and ``notes``; returns how many were rewritten (the others are noted as untouched)."""
    captured, skipped = capture_submodule_inputs(source, inputs, names)
    notes += [f"{name} left untouched: {why}" for name, why in skipped.items()]
    job.untouched.update({f"{job.path}{name}": why for name, why in skipped.items()})
    done = 0
    for name, sub_inputs in captured.items():
        child = target.get_submodule(name)
        bare = not list(child.children())  # a layer traced on its own: its one site is the layer itself
        if bare and name in job.exclude:
            sites += bare_candidate(job.rules.direction, name, child, sub_inputs, "excluded by the caller")
            continue
        try:
            new, sub_sites, sub_notes = _rewrite_structure(child, sub_inputs, job.below(name, source))
        except SurgeryError as e:
            notes.append(f"{name} left untouched: {cause_of(e)}")
            job.untouched[f"{job.path}{name}"] = cause_of(e)
            continue
        done += 1
        single = bare and len(sub_sites) == 1
        sites += [dataclasses.replace(s, name=name if single else f"{name}.{s.name}") for s in sub_sites]
        sites += bare_candidate(job.rules.direction, name, child, sub_inputs) if not sub_sites else []
        notes += [f"in {name}: {n}" for n in sub_notes]
        if any(s.rewritten for s in sub_sites):  # else the child stays as it was: its class, its attributes
            keep_attributes(new, child)
            target.set_submodule(name, new)
            merge_layouts(target, f"{name}.", new)
    return done


def _error_with(
    model: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    job: _Job,
    rewritten: list[Site],
    group: list[Site],
    original: nn.Module,
    options: Options,
) -> float | None:
    """The validation error with only the sites of ``group`` rewritten (None: it passes)."""
    others = [s.name for s in rewritten if s not in group]
    job = dataclasses.replace(job, exclude=[*job.exclude, *others])
    model, again = moe.for_group(model, rewritten, options, job.exclude, job.skip)  # experts: dense before capture
    job = dataclasses.replace(job, captured={}) if again else job
    gm, _, _ = _rewrite_structure(model, inputs, job)
    check = validate(
        original,
        gm,
        inputs,
        num_random=0,
        precision=options.precision,
        rtol=options.rtol,
        seed=options.seed,
        original_copy=original,
    )
    return None if check else check.max_rel_error
