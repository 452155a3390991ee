"""Each runtime is named once (fxsurgery.runtimes.registry), and what it offers is what its backend implements; the
options, the CLI, the targets and the cross-check take their names from it."""

from __future__ import annotations

import argparse

import pytest

import fxsurgery
from fxsurgery.cli.parser import build_parser
from fxsurgery.plan.targets import TARGETS
from fxsurgery.runtimes.registry import CAPABILITIES, RUNTIMES, Backend, get, named, of_target

METHODS = {"run": "run", "time": "timer", "census": "census"}


@pytest.mark.parametrize("name", sorted(RUNTIMES))
def test_a_runtime_offers_what_its_backend_implements(name):
    runtime = RUNTIMES[name]
    backend = type(runtime.impl())  # importable without the runtime's own package: it is imported when used
    implemented = {c for c in CAPABILITIES if getattr(backend, METHODS[c]) is not getattr(Backend, METHODS[c])}
    assert implemented == set(runtime.offers), (name, implemented, runtime.offers)


def test_names_labels_and_targets_are_each_given_once():
    for field in ("name", "label", "backend"):
        values = [getattr(r, field) for r in RUNTIMES.values()]
        assert len(set(values)) == len(values), field
    targets = [r.target for r in RUNTIMES.values() if r.target]
    assert sorted(targets) == sorted(TARGETS) and all(of_target(t).target == t for t in targets)
    assert {t.toolchain for t in TARGETS.values()} <= {r.package for r in RUNTIMES.values()}


def test_the_options_and_the_command_line_take_their_runtimes_from_the_registry():
    assert set(named("time")) == {"onnxruntime", "torch", "openvino"}
    assert set(named("run")) == {"openvino", "executorch"}
    for name in named("time"):
        assert fxsurgery.Options(runtime=name).runtime == name
    with pytest.raises(fxsurgery.InputError, match="runtime must be one of"):
        fxsurgery.Options(runtime="executorch")  # it runs and counts, but is not timed
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    rewrite = sub.choices["rewrite"]
    runtime = next(a for a in rewrite._actions if a.dest == "runtime")
    target = next(a for a in rewrite._actions if a.dest == "target")
    assert tuple(runtime.choices) == named("time") and sorted(target.choices) == sorted(TARGETS)


def test_asking_a_runtime_for_what_it_does_not_do_is_one_clear_error():
    with pytest.raises(fxsurgery.InputError, match="unknown timing runtime 'coreml': use one of onnxruntime"):
        get("coreml", "time", "timing")
    assert get("torch", "time", "timing").name == "torch"
