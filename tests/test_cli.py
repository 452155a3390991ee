"""The command line, through a subprocess: success paths, every bad input, and the example scripts."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

MODELS = textwrap.dedent(
    """
    import torch
    from torch import nn
    from fxsurgery.models import NiNClassifier

    def make():
        torch.manual_seed(0)
        return NiNClassifier()

    def not_a_module():
        return 42

    def broken():
        raise ValueError("cannot build")

    def exits():
        import sys
        sys.exit(0)

    class Block(nn.Module):  # a transformer block on (B, S, C) tokens
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.ln = nn.LayerNorm(8)
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.fc = nn.Linear(8, 8)
        def forward(self, x):
            h = self.ln(x)
            return self.fc(x + self.attn(h, h, h, need_weights=False)[0])

    def bert():  # a HuggingFace model, called with keyword inputs
        import transformers
        torch.manual_seed(0)
        config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                         intermediate_size=64, num_labels=3)
        return transformers.BertForSequenceClassification(config)

    class Branchy(nn.Module):  # untraceable, and no submodule to rewrite instead
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(2, 12))
        def forward(self, x):
            if x.sum() > 0:
                x = -x
            return torch.flatten(x, 1) @ self.w.t()
    """
)


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fxsurgery", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=600)  # fmt: skip


@pytest.fixture(scope="module")
def models_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("models") / "models.py"
    path.write_text(MODELS)
    return path


def test_rewrite_success_writes_everything(models_file, tmp_path):
    out = tmp_path / "out"
    proc = run("rewrite", f"{models_file}:make", "--to", "conv", "--input-shape", "2,3,32,32", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "overall: PASSED" in proc.stdout and "Traceback" not in proc.stderr
    assert "exporting both versions to ONNX" in proc.stderr  # progress on stderr
    files = {p.name for p in out.iterdir()}
    assert {"original.onnx", "rewritten.onnx", "report.json", "rewritten.safetensors", "rewritten_code.py"} <= files
    report = json.loads((out / "report.json").read_text())
    assert report["passed"] is True and report["onnx"]["passed"] is True
    assert {s["name"] for s in report["sites"] if s["status"] == "rewritten"} == {"classifier.1", "classifier.4", "aux"}
    assert set(report["sites"][0]) == {"name", "pattern", "status", "reason", "before", "after", "input_shape",
                                      "direction", "calls", "subgraph"}
    assert set(report["sites"][0]["subgraph"]) == {"before", "after"}
    # the saved program loads back and computes what the original computes
    program = torch.export.load(str(out / "rewritten.pt2")).module()
    sys.path.insert(0, str(models_file.parent))
    try:
        import models  # type: ignore[import-not-found]

        original = models.make().eval()
    finally:
        sys.path.pop(0)
    for batch in (1, 2, 7):  # a dynamic batch, as the ONNX files have
        x = torch.randn(batch, 3, 32, 32)
        with torch.no_grad():
            torch.testing.assert_close(program(x), original(x), rtol=1e-4, atol=1e-5)
    # the original's checkpoint, converted with the layouts the rewrite wrote, is the rewritten model's
    from safetensors.torch import load_file, save_file

    save_file({k: v.contiguous() for k, v in original.state_dict().items()}, str(tmp_path / "original.safetensors"))
    proc = run("convert", str(tmp_path / "original.safetensors"), str(tmp_path / "conv"), "--layouts",
               str(out / "layouts.json"))  # fmt: skip
    assert proc.returncode == 0 and "3 in the rewritten format" in proc.stdout, proc.stderr
    converted, expected = load_file(tmp_path / "conv" / "original.safetensors"), load_file(out / "rewritten.safetensors")
    assert converted.keys() == expected.keys() and all(torch.equal(converted[k], expected[k]) for k in expected)
    proc = run("convert", str(tmp_path / "original.safetensors"), str(tmp_path / "conv"), "--layouts",
               str(out / "layouts.json"))  # fmt: skip
    assert proc.returncode != 0 and "exists and is not empty" in proc.stderr and "Traceback" not in proc.stderr


def test_keyword_inputs_and_integer_ids(models_file, tmp_path):
    pytest.importorskip("transformers")
    out = tmp_path / "out"
    proc = run("rewrite", f"{models_file}:bert", "--to", "conv", "--token-layout", "--input-shape", "2,8:int64",
               "--input", "attention_mask=2,8:int64", "--out", str(out), "--json", "--quiet")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["passed"] and report["frontend"] == "export" and report["onnx"]["passed"]
    assert sum(s["status"] == "rewritten" for s in report["sites"]) == 6  # q, k, v, out, MLP in and out
    assert report["notes"][0].startswith("front end: export")


def test_rewrite_json_quiet_weights_and_torchscript(models_file, tmp_path):
    sys.path.insert(0, str(models_file.parent))
    try:
        import models  # type: ignore[import-not-found]

        model = models.make()
    finally:
        sys.path.pop(0)
    from safetensors.torch import save_file

    weights = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    out = tmp_path / "out"
    proc = run("rewrite", f"{models_file}:make", "--to", "linear", "--input-shape", "2,3,32,32", "--out", str(out),
               "--weights", str(weights), "--exporter", "torchscript", "--json", "--quiet")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    data = json.loads(proc.stdout)
    assert data["passed"] and data["onnx"]["exporter"] == "torchscript"
    assert data == json.loads((out / "report.json").read_text())  # --json prints report.json, saved files included
    assert data["schema_version"] == 1 and data["versions"]["torch"] == torch.__version__
    assert data["inputs"] == [{"name": "input_0", "shape": [2, 3, 32, 32], "dtype": "float32"}]
    assert "rewritten.safetensors" in data["saved"] and data["command"]
    for key in ("original_path", "rewritten_path"):  # paths in --out, not in the staging folder
        assert Path(data["onnx"][key]).parent == out and Path(data["onnx"][key]).is_file()
    assert len({f.stat().st_mode for f in out.iterdir()}) == 1  # one mode for every file written
    pt = tmp_path / "w.pt"
    torch.save(model.state_dict(), pt)
    proc = run("rewrite", f"{models_file}:make", "--to", "linear", "--input-shape", "2,3,32,32", "--out",
               str(tmp_path / "out2"), "--weights", str(pt), "--quiet")  # fmt: skip
    assert proc.returncode == 0, proc.stderr


def test_token_layout_flag(models_file, tmp_path):
    argv = ["rewrite", f"{models_file}:Block", "--to", "conv", "--input-shape", "2,5,8", "--json"]
    plain = run(*argv, "--out", str(tmp_path / "plain"))
    assert plain.returncode == 0, plain.stderr
    assert not [s for s in json.loads(plain.stdout)["sites"] if s["status"] == "rewritten"]
    tokens = run(*argv, "--token-layout", "--out", str(tmp_path / "tokens"))
    assert tokens.returncode == 0, tokens.stderr
    report = json.loads(tokens.stdout)
    assert report["passed"]
    assert {s["name"] for s in report["sites"] if s["status"] == "rewritten"} == {"attn", "attn.out_proj", "fc"}


def test_module_spec_and_several_inputs(tmp_path):
    pkg = tmp_path / "pkg_models"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        "import torch\nfrom torch import nn\n"
        "class Two(nn.Module):\n"
        "    def __init__(self):\n        super().__init__()\n        self.fc = nn.Linear(8, 3)\n"
        "    def forward(self, a, b):\n        return self.fc(torch.flatten(a + b, 1))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "fxsurgery", "rewrite", "pkg_models:Two", "--to", "conv", "--input-shape", "2,2,2,2",
         "--input-shape", "2,2,2,2", "--out", str(tmp_path / "o"), "--quiet"],
        capture_output=True, text=True, cwd=tmp_path, env={**__import__("os").environ, "PYTHONPATH": str(tmp_path)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "fc" in proc.stdout and "rewritten" in proc.stdout


def test_list_shows_the_sites_without_exporting(models_file, tmp_path):
    proc = run("list", f"{models_file}:make", "--to", "conv", "--input-shape", "2,3,32,32", "--json", "--quiet",
               "--exclude", "aux", cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert {s["name"]: s["status"] for s in data["sites"]} == {"classifier.1": "rewritten", "classifier.4": "rewritten",
                                                               "aux": "skipped"}  # fmt: skip
    assert data["direction"] == "linear_to_conv" and not list(tmp_path.iterdir())  # nothing written


def test_artifacts_choose_the_files_and_the_cross_check_still_runs(models_file, tmp_path):
    out = tmp_path / "out"
    proc = run("rewrite", f"{models_file}:make", "--to", "conv", "--input-shape", "2,3,32,32", "--out", str(out),
               "--artifacts", "safetensors", "--json", "--quiet")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    files = {p.name for p in out.iterdir()}
    assert files == {"report.json", "report.html", "rewritten.safetensors", "original_format.safetensors",
                     "layouts.json"}
    report = json.loads(proc.stdout)
    assert report["onnx"]["passed"] is True and len(report["onnx"]["comparisons"]) > 0  # checked, not kept
    assert report["onnx"]["original_path"] == "(not kept: --artifacts without onnx)"
    assert set(report["saved"]) == files - {"report.json"}
    modes = {(out / f).stat().st_mode & 0o777 for f in files}
    assert len(modes) == 1  # one mode for every file


def test_artifacts_none_writes_only_the_report_and_a_dry_run_writes_nothing(models_file, tmp_path):
    out = tmp_path / "out"
    proc = run("rewrite", f"{models_file}:make", "--to", "conv", "--input-shape", "2,3,32,32", "--out", str(out),
               "--artifacts", "none", "--quiet")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert {p.name for p in out.iterdir()} == {"report.json", "report.html"}
    proc = run("rewrite", f"{models_file}:make", "--to", "conv", "--input-shape", "2,3,32,32", "--dry-run",
               "--quiet", cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0 and "classifier.1" in proc.stdout and "would rewrite" in proc.stdout, proc.stderr
    assert {p.name for p in tmp_path.iterdir()} == {"out"}  # nothing new written
    for bad, message in ((["--artifacts", "onnx,weights"], "unknown artifact 'weights'"),
                         (["--dry-run", "--to", "auto"], "--dry-run lists the sites of one direction"),
                         ([], "--out is required")):  # fmt: skip
        argv = ["rewrite", f"{models_file}:make", "--input-shape", "2,3,32,32", *bad]
        proc = run(*argv, *([] if "--to" in bad else ["--to", "conv"]), "--quiet")
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_model_kwargs_opset_rtol_and_a_static_batch(tmp_path):
    argv = ["rewrite", "torch.nn:Linear", "--model-kwargs", '{"in_features": 4, "out_features": 3}', "--to", "conv",
            "--input-shape", "2,4", "--out", str(tmp_path / "o"), "--quiet", "--json"]  # fmt: skip
    proc = run(*argv, "--opset", "18", "--rtol", "1e-3", "--static-batch")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["onnx"]["dynamic_batch"] is False and data["onnx"]["rtol"] == 1e-3
    import onnx

    model = onnx.load(data["onnx"]["rewritten_path"])
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [18]
    bad = run("rewrite", "torch.nn:Linear", "--model-kwargs", "[4, 3]", "--to", "conv", "--input-shape", "2,4",
              "--out", str(tmp_path / "p"))  # fmt: skip
    assert bad.returncode == 2 and "--model-kwargs must be a JSON object" in bad.stderr


def _bad_weights(tmp_path: Path) -> str:
    from safetensors.torch import save_file

    path = tmp_path / "bad.safetensors"
    save_file({"nope.weight": torch.zeros(2)}, str(path))
    return str(path)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["rewrite", "no_such_pkg.mod:make", "--to", "conv", "--input-shape", "1,3,32,32"], "cannot import module"),
        (["rewrite", "{models}:missing", "--to", "conv", "--input-shape", "1,3,32,32"], "has no attribute 'missing'"),
        (["rewrite", "{models}:not_a_module", "--to", "conv", "--input-shape", "1,3,32,32"], "not a torch.nn.Module"),
        (["rewrite", "{models}:broken", "--to", "conv", "--input-shape", "1,3,32,32"], "ValueError: cannot build"),
        (["rewrite", "{models}", "--to", "conv", "--input-shape", "1,3,32,32"], "MODEL must be"),
        (["rewrite", "{models}:make", "--to", "conv", "--input-shape", "1,3,x,y"], "malformed --input-shape"),
        (["rewrite", "{models}:make", "--to", "conv", "--input-shape", "1,3,0,32"], "positive integer"),
        (["rewrite", "{models}:make", "--to", "conv", "--input-shape", "3,32"], "has 2 dims"),
        (["rewrite", "{models}:make", "--to", "conv", "--input-shape", "1,3,32,32", "--weights", "{tmp}/none.pt"],
         "weights file not found"),
        (["rewrite", "{models}:make", "--to", "conv", "--input-shape", "1,3,32,32", "--weights", "{bad}"],
         "does not match the model: missing"),
        (["rewrite", "{models}:Branchy", "--to", "conv", "--input-shape", "1,3,2,2"], "cannot trace"),
        (["rewrite", "{models}:make", "--to", "cnv", "--input-shape", "1,3,32,32"], "invalid choice"),
        (["rewrite", "{models}:make", "--input-shape", "1,3,32,32"], "required: --to"),
        (["rewrite", "{models}:exits", "--to", "conv", "--input-shape", "1,3,32,32"], "exited (SystemExit: 0)"),
        (["rewrite", "{models}:make", "--to", "conv", "--input-shape", "100000,100000,100000,100000"],
         "GiB of example inputs"),
        (["rewrite", "{models}:make", "--to", "conv", "--input-shape", "1,1,1000,1000000"], "use a smaller shape"),
        (["rewrite", "{models}:make", "--to", "conv"], "no example input"),
        (["rewrite", "{models}:make", "--to", "conv", "--input", "1,3,32,32"], "expected NAME=SHAPE"),
        (["rewrite", "{models}:make", "--to", "conv", "--input-shape", "1,3,32,32:int8"], "unknown dtype 'int8'"),
    ],
    ids=["module", "callable", "not-module", "factory-raises", "no-colon", "shape", "zero-dim", "ndim", "no-weights",
         "bad-weights", "untraceable", "bad-to", "missing-to", "sys-exit", "huge-input", "4gb-input", "no-input",
         "unnamed-keyword", "bad-dtype"],
)  # fmt: skip
def test_bad_input_exits_2_with_one_line(models_file, tmp_path, argv, message):
    out = tmp_path / "out"
    subst = {"models": str(models_file), "tmp": str(tmp_path)}
    if "{bad}" in argv:
        subst["bad"] = _bad_weights(tmp_path)
    argv = [a.format(**subst) for a in argv] + ["--out", str(out), "--quiet"]
    proc = run(*argv)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("fxsurgery: error:") and message in lines[0], proc.stderr
    assert not out.exists()  # nothing half-written that looks valid
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


def test_output_dir_problems(models_file, tmp_path):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("x")
    proc = run("rewrite", f"{models_file}:make", "--to", "conv", "--input-shape", "1,3,32,32", "--out", str(taken))
    assert proc.returncode == 2 and "exists and is not empty" in proc.stderr
    afile = tmp_path / "afile"
    afile.write_text("x")
    proc = run("rewrite", f"{models_file}:make", "--to", "conv", "--input-shape", "1,3,32,32", "--out",
               str(afile / "sub"))  # fmt: skip
    assert proc.returncode == 2 and "cannot write to" in proc.stderr and "Traceback" not in proc.stderr


def test_demo():
    proc = run("demo", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert "=== to conv ===" in proc.stdout and "=== to linear ===" in proc.stdout
    assert proc.stdout.count("overall: PASSED") == 2
    assert "fxsurgery-demo-" not in proc.stdout and "(removed: pass --out DIR" in proc.stdout  # no deleted paths
    assert run("--version").stdout.startswith("fxsurgery ")


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "scripts").glob("*.py")))
def test_example_scripts_run(script, tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / script), str(tmp_path)], capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "rewritten.onnx").is_file()


def test_check_is_rewrite_by_the_api_s_name_with_a_dotted_model_and_steps_timed(tmp_path):
    """``fxsurgery check`` runs ``rewrite``; MODEL may be dotted (``torch.nn.Linear``); the long step shows its
    sub-steps with their times; the command recorded in report.json is shell-quoted (it can be pasted back)."""
    import shlex

    kwargs = '{"in_features": 8, "out_features": 4}'
    out = tmp_path / "o"
    proc = run("check", "torch.nn.Linear", "--model-kwargs", kwargs, "--input-shape", "2,8", "--to", "conv",
               "--artifacts", "none", "--out", str(out))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"^fxsurgery:   exporting the original model to ONNX \(dynamo, batch axes\) \.\.\. \d+\.\ds$",
                     proc.stderr, re.M), proc.stderr  # fmt: skip
    assert re.search(r"^fxsurgery:   running rewritten\.onnx in onnxruntime .* \d+\.\ds$", proc.stderr, re.M)
    command = json.loads((out / "report.json").read_text())["command"]
    assert shlex.split(command)[-12:] == ["check", "torch.nn.Linear", "--model-kwargs", kwargs, "--input-shape", "2,8",
                                          "--to", "conv", "--artifacts", "none", "--out", str(out)]  # fmt: skip


def test_a_bench_row_says_faster_slower_or_within_noise():
    from fxsurgery.runtimes.bench import BenchRow
    from fxsurgery.runtimes.timing import Ratio

    noise = Ratio(1.0, 0.97, 1.03, 1.0, 1.0, 7)
    row = lambda m, lo, hi: BenchRow("onnxruntime", 1, Ratio(m, lo, hi, 1.0, m, 7), noise)  # noqa: E731
    assert row(0.8, 0.75, 0.9).verdict == "faster" and row(1.3, 1.2, 1.4).verdict == "slower"
    assert row(0.98, 0.9, 1.05).verdict == "within noise" and row(0.96, 0.95, 0.98).verdict == "within noise"


def test_model_specs_resolve_as_entry_points_do():
    """``package.module:callable`` (also a dotted attribute path after the colon) resolves as
    ``pkgutil.resolve_name`` reads entry points; a missing attribute is one usage error."""
    import collections

    from fxsurgery.cli.inputs import UsageError
    from fxsurgery.cli.model import load_factory

    assert load_factory("torch.nn:Sequential") is torch.nn.Sequential
    assert load_factory("torch.nn.Sequential") is torch.nn.Sequential  # dotted, as it is written in Python
    with pytest.raises(UsageError, match=r"cannot resolve 'torch\.nn\.Nope'.*e\.g\. torch\.nn:Nope"):
        load_factory("torch.nn.Nope")
    assert load_factory("collections:OrderedDict.fromkeys") == collections.OrderedDict.fromkeys
    with pytest.raises(UsageError, match="has no attribute 'OrderedDict.nope'"):
        load_factory("collections:OrderedDict.nope")


def _saved_program(path, batch=2):
    from fxsurgery.models import demo_model

    model, x = demo_model().eval(), torch.randn(batch, 3, 32, 32)
    program = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, path)
    return model


def test_a_pt2_file_is_a_model_with_its_own_example_inputs(tmp_path):
    """``fxsurgery rewrite model.pt2``: the ExportedProgram is rewritten through the export front end, validated
    against the program, cross-checked; the rewritten program runs and matches the original model."""
    model = _saved_program(tmp_path / "demo.pt2")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "fxsurgery", "rewrite", str(tmp_path / "demo.pt2"), "--to", "conv",
                           "--out", str(out), "--quiet", "--json"], capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["passed"] and data["frontend"] == "export" and data["inputs"][0]["shape"] == [2, 3, 32, 32]
    assert {s["name"] for s in data["sites"] if s["status"] == "rewritten"} == {"classifier.1", "classifier.4", "aux"}
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(torch.export.load(out / "rewritten.pt2").module()(x), model(x), rtol=1e-4, atol=1e-5)


def test_a_pt2_file_takes_other_inputs_and_refuses_factory_options(tmp_path):
    _saved_program(tmp_path / "demo.pt2")
    base = [sys.executable, "-m", "fxsurgery", "list", str(tmp_path / "demo.pt2"), "--to", "linear", "--quiet"]
    proc = subprocess.run([*base, "--input-shape", "4,3,32,32", "--json"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert sum(s["status"] == "rewritten" for s in json.loads(proc.stdout)["sites"]) >= 3
    proc = subprocess.run([*base, "--weights", str(tmp_path / "w.safetensors")], capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "--weights applies to a model factory, not to a .pt2 file" in proc.stderr


def test_third_party_logs_are_quieted_while_the_command_runs_and_restored_after(monkeypatch, capsys):
    """Known-harmless logs (the exporter's, onnxscript's, the toolchains') are quieted during a command unless -v,
    and every logger's level is what it was afterwards (an in-process caller keeps its logging set-up)."""
    import logging

    from fxsurgery.cli import _NOISY, main
    from fxsurgery.cli import _third_party_quiet as quiet

    levels = {name: logging.getLogger(name).level for name in _NOISY}
    seen = {}
    with quiet(False):
        seen["quiet"] = {name: logging.getLogger(name).level for name in _NOISY}
    with quiet(True):
        seen["verbose"] = {name: logging.getLogger(name).level for name in _NOISY}
    assert set(seen["quiet"].values()) == {logging.ERROR} and seen["verbose"] == levels
    assert main(["list", "fxsurgery.models:demo_model", "--input-shape", "1,3,32,32", "--to", "conv", "--quiet"]) == 0
    assert {name: logging.getLogger(name).level for name in _NOISY} == levels
    assert "would rewrite 3" in capsys.readouterr().out
