"""Third round of hostile cases: state a forward writes follows the original, torch.export's guards are kept, files
from outside run no code, reports draw no markup from their data, and every failure is one readable line. Expected
values come from the original model, run on its own."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

import fxsurgery
from fxsurgery.models import demo_model

l2c, c2l = fxsurgery.linear_to_conv, fxsurgery.conv_to_linear
ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fxsurgery", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=600)  # fmt: skip


def one_line_error(proc: subprocess.CompletedProcess, code: int = 2) -> str:
    assert proc.returncode == code, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("fxsurgery: error:")]
    assert len(errors) == 1, proc.stderr[-2000:]
    return errors[0]


# -- .pt2 files run no code unless told ------------------------------------------------------------------------------


class _Payload:
    """Unpickling this opens (creates) a file: any code could stand there."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _with_entry(src: Path, dst: Path, suffix: str, payload: object) -> None:
    """``src`` with the archive entry ending in ``suffix`` replaced by ``torch.save(payload)``."""
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        hits = [n for n in zin.namelist() if n.endswith(suffix)]
        assert hits, zin.namelist()
        for item in zin.infolist():
            zout.writestr(item, buffer.getvalue() if item.filename in hits else zin.read(item.filename))


@pytest.fixture(scope="module")
def demo_pt2(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pt2") / "demo.pt2"
    torch.export.save(torch.export.export(demo_model().eval(), (torch.randn(2, 3, 32, 32),)), str(path))
    return path


@pytest.mark.parametrize("entry", ["data/sample_inputs/model.pt", "data/weights/weight_0"])
def test_a_pt2_holding_a_pickle_payload_runs_nothing_without_unsafe_pickle(demo_pt2, tmp_path, entry):
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.pt2"
    _with_entry(demo_pt2, evil, entry, ((_Payload(marker),), {}) if "sample" in entry else _Payload(marker))
    for command in ("list", "rewrite", "bench"):
        extra = ["--out", str(tmp_path / f"out-{command}")] if command == "rewrite" else []
        line = one_line_error(cli(command, str(evil), "--to", "conv", "--quiet", *extra))
        assert not marker.exists(), f"{command} ran code from the file"
        assert "--unsafe-pickle" in line and "evil.pt2" in line
    assert not (tmp_path / "out-rewrite").exists()


def test_a_pt2_holding_a_pickled_object_constant_is_refused_before_loading(demo_pt2, tmp_path):
    evil = tmp_path / "objects.pt2"
    with zipfile.ZipFile(demo_pt2) as zin, zipfile.ZipFile(evil, "w") as zout:
        root = zin.namelist()[0].split("/")[0]
        for item in zin.infolist():
            zout.writestr(item, zin.read(item.filename))
        zout.writestr(f"{root}/data/constants/opaque_obj_0", b"\x80\x04N.")
    line = one_line_error(cli("list", str(evil), "--to", "conv", "--quiet"))
    assert "holds pickled objects" in line and "--unsafe-pickle" in line


def test_an_ordinary_pt2_still_loads_and_unsafe_pickle_is_the_way_out(demo_pt2, tmp_path):
    proc = cli("list", str(demo_pt2), "--to", "conv", "--quiet", "--json")
    assert proc.returncode == 0, proc.stderr
    assert sum(s["status"] == "rewritten" for s in json.loads(proc.stdout)["sites"]) == 3
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.pt2"
    _with_entry(demo_pt2, evil, "data/sample_inputs/model.pt", ((_Payload(marker),), {}))
    cli("list", str(evil), "--to", "conv", "--quiet", "--unsafe-pickle", "--input-shape", "2,3,32,32")
    assert marker.exists()  # the user asked for full unpickling, and got it: the flag is what guards


def test_help_and_readme_say_what_model_and_pt2_loading_may_run():
    proc = cli("rewrite", "--help")
    text = " ".join(proc.stdout.split())
    assert "runs their code" in text and "--unsafe-pickle" in text and "unpickling" in text
    readme = (ROOT / "docs" / "cli.md").read_text()
    assert "MODEL imports" in readme and "runs" in readme and ".pt2" in readme and "--unsafe-pickle" in readme


# -- every subcommand: bad input is one line, exit 2 -----------------------------------------------------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory, demo_pt2) -> Path:
    d = tmp_path_factory.mktemp("bad")
    (d / "garbage.pt2").write_bytes(b"not a zip")
    (d / "layouts.json").write_text('{"layouts": 3}')
    (d / "empty").mkdir()
    (d / "report").mkdir()
    (d / "report" / "report.json").write_text('{"sites": [{"name": 1}]}')
    return d


@pytest.mark.parametrize("argv, message", [
    (["list", "{d}/garbage.pt2", "--to", "conv"], "cannot read"),
    (["rewrite", "{pt2}", "--to", "conv", "--input-shape", "1,2", "--out", "{d}/o1"], "exported with size"),
    (["list", "{pt2}", "--to", "conv", "--input-shape", "2,3,32,32:int64"], "fails on the example inputs"),
    (["bench", "{pt2}", "--to", "conv", "--batch", "0"], "at least 1"),
    (["bench", "fxsurgery.models:demo_model", "--to", "conv", "--input-shape", "2,3,32,32", "--chart",
      "{d}/no/such/chart.png"], "--chart"),
    (["convert", "{d}/empty", "{d}/dst", "--layouts", "{d}/layouts.json"], "not a layouts file"),
    (["convert", "{d}/nowhere", "{d}/dst", "--layouts", "{d}/nothing.json"], "not a layouts file"),
    (["report", "{d}/report"], "not a report fxsurgery wrote"),
    (["report", "{d}/garbage.pt2"], "not found"),
    (["rewrite", "fxsurgery.models:demo_model", "--to", "conv", "--input-shape", "2,3,32,32", "--out",
      "{d}/missing/parent/out"], "does not exist"),
], ids=["pt2-garbage", "pt2-wrong-shape", "pt2-wrong-dtype", "bench-batch-0", "bench-chart-folder",
        "convert-bad-layouts", "convert-no-layouts", "report-malformed", "report-not-a-folder",
        "rewrite-no-parent"])  # fmt: skip
def test_every_subcommand_answers_bad_input_with_one_line(files, demo_pt2, argv, message):
    args = [a.format(d=files, pt2=demo_pt2) for a in argv]
    assert message in one_line_error(cli(*args))


def test_an_error_nobody_foresaw_is_still_one_line_and_says_so(tmp_path):
    model = tmp_path / "m.py"
    model.write_text("import torch\nclass Odd(torch.nn.Module):\n    def __init__(self):\n"
                     "        super().__init__()\n        self.fc = torch.nn.Linear(4, 4)\n"
                     "    def forward(self, x):\n        return self.fc(x)\n"
                     "    def named_modules(self, *a, **k):\n        raise ZeroDivisionError('deep inside')\n"
                     "def make():\n    return Odd()\n")  # fmt: skip
    args = ("list", f"{model}:make", "--to", "conv", "--input-shape", "2,4")
    line = one_line_error(cli(*args))
    assert "ZeroDivisionError: deep inside" in line and "FXSURGERY_TRACEBACK=1" in line
    import os

    shown = subprocess.run([sys.executable, "-m", "fxsurgery", *args], capture_output=True, text=True, timeout=600,
                           env={**os.environ, "FXSURGERY_TRACEBACK": "1"})  # fmt: skip
    assert "Traceback" in shown.stderr  # asked for: where it happened, for a report


# -- the meta device: what it can and cannot do, said -----------------------------------------------------------------


def _meta_demo():
    with torch.device("meta"):
        return demo_model().eval(), torch.empty(2, 3, 32, 32)


def test_a_benchmark_of_a_meta_model_is_refused_instead_of_timing_nothing():
    model, x = _meta_demo()
    for inputs in (x, torch.randn(2, 3, 32, 32)):
        with pytest.raises(fxsurgery.InputError, match="a benchmark runs the models on real values.*meta device"):
            fxsurgery.benchmark(model, inputs, pairs=2, validate=False)


def test_check_on_a_meta_model_says_what_meta_can_do(tmp_path):
    model, x = _meta_demo()
    with pytest.raises(fxsurgery.InputError, match="check .*meta device.*validate=False.*convert_checkpoint"):
        fxsurgery.check(model, x, out_dir=tmp_path / "out", validate=False)
    with pytest.raises(fxsurgery.InputError, match="validation runs the models on real values"):
        fxsurgery.linear_to_conv(model, x)
    res = fxsurgery.check(model, x, out_dir=tmp_path / "out", validate=False, onnx=False)  # the rewrite itself works
    assert len(res.surgery.rewritten) == 3 and not (tmp_path / "out").exists()


# -- state a forward writes follows the original ---------------------------------------------------------------------


class Running(nn.Module):
    """A running mean the output does not read."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 4, 1), nn.Linear(16, 5)
        self.register_buffer("running", torch.zeros(16))

    def forward(self, x):
        f = self.conv(x).flatten(1)
        self.running.mul_(0.9).add_(f.mean(0) * 0.1)
        return self.fc(f)


class Steps(nn.Module):
    """Writes that do not involve the input: fx would run them once, while tracing."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 4, 1), nn.Linear(16, 5)
        self.register_buffer("steps", torch.zeros(()))
        self.register_buffer("decay", torch.ones(16))

    def forward(self, x):
        self.steps += 1
        self.decay.mul_(0.9)
        return self.fc(self.conv(x).flatten(1)) * self.steps


class Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.block, self.head = Steps(), nn.Conv2d(5, 6, 1)

    def forward(self, x):
        return self.head(self.block(x)[:, :, None, None])


class Count(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 4, 1), nn.Linear(16, 5)
        self.register_buffer("count", torch.zeros(()))

    def forward(self, x):
        self.count.add_(1)
        return self.fc(self.conv(x).flatten(1)) * self.count


class Reassign(nn.Module):
    """A buffer replaced rather than written to."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 4, 1), nn.Linear(16, 5)
        self.register_buffer("steps", torch.zeros(()))

    def forward(self, x):
        self.steps = self.steps + 1
        return self.fc(self.conv(x).flatten(1)) * self.steps


class ScalesInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 4, 1), nn.Linear(16, 5)

    def forward(self, x):
        y = self.fc(self.conv(x).flatten(1))
        x.mul_(2)  # the caller's tensor is written to: part of what the forward does
        return y


class BNHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Linear(16, 5)

    def forward(self, x):
        return self.fc(self.bn(self.conv(x)).flatten(1))


def _in_step(model: nn.Module, rewritten: nn.Module, calls: int = 3) -> None:
    """The rewritten module and a copy of the original, called alike, give the same outputs and the same state."""
    import copy

    reference = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(1)
    for _ in range(calls):
        x = torch.randn(4, 3, 2, 2, generator=gen)
        with torch.no_grad():
            a, b = reference(x.clone()), rewritten(x.clone())
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    ours = dict(rewritten.named_buffers())
    for name, value in reference.named_buffers():
        torch.testing.assert_close(ours[name], value, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("model_type", [Running, Steps, Outer, Count, Reassign])
@pytest.mark.parametrize("frontend", ["fx", "export", "auto"])
@pytest.mark.parametrize("direction", ["linear_to_conv", "conv_to_linear"])
def test_state_written_by_the_forward_follows_the_original(model_type, frontend, direction):
    model = model_type().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = fxsurgery.rewrite(model, torch.randn(4, 3, 2, 2), direction, frontend=frontend)
    assert res.validation.passed
    _in_step(model, res.module)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the user's model never ran


def test_fx_says_why_a_forward_that_writes_state_is_kept_as_code():
    res = l2c(Steps().eval(), torch.randn(4, 3, 2, 2), frontend="fx")
    assert "writes to 'steps' where torch.fx cannot record it" in res.notes[1]
    assert [(s.name, s.status) for s in res.sites] == [("fc", "skipped")]  # listed, with its reason
    res = l2c(Steps().eval(), torch.randn(4, 3, 2, 2))  # auto: torch.export records the writes
    assert res.frontend == "export" and [s.status for s in res.sites] == ["rewritten"]
    res = c2l(Outer().eval(), torch.randn(4, 3, 2, 2), frontend="fx")  # the writer is a submodule: only it is kept
    assert {s.name: s.status for s in res.sites}["head"] == "rewritten"


def test_an_exported_program_keeps_its_buffer_updates_in_the_module_and_the_program():
    model = Running().eval()
    res = l2c(torch.export.export(model, (torch.randn(4, 3, 2, 2),)), None)
    assert res.rewritten
    _in_step(model, res.module)
    program = res.program.module()
    _in_step(model, program)


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_batch_norm_in_training_mode_keeps_counting(frontend):
    model = BNHead().train()
    res = l2c(model, torch.randn(4, 3, 2, 2), frontend=frontend, validate=False)
    assert res.rewritten and res.module.training
    _in_step(model, res.module)  # running statistics and num_batches_tracked move as the original's do
    assert int(res.module.get_buffer("bn.num_batches_tracked")) == 3


def test_a_forward_that_writes_to_its_input_does_the_same_after_the_rewrite():
    model = ScalesInput().eval()
    res = l2c(model, torch.randn(4, 3, 2, 2), frontend="fx")
    x = torch.randn(4, 3, 2, 2)
    a, b = x.clone(), x.clone()
    model(a)
    res.module(b)
    assert torch.equal(a, b) and torch.equal(a, 2 * x)


def test_validation_compares_the_state_a_forward_leaves_behind():
    from fxsurgery.verify.validation import validate

    class Forgetful(Count):  # the same outputs, call by call, but the buffer never moves
        calls = 0

        def forward(self, x):
            self.calls += 1
            return self.fc(self.conv(x).flatten(1)) * self.calls

    model = Count().eval()
    wrong = Forgetful().eval()
    wrong.load_state_dict(model.state_dict())
    check = validate(model, wrong, (torch.randn(4, 3, 2, 2),), num_random=0)
    assert not check and "count after the forward" in check.failure
    check = validate(model, model, (torch.randn(4, 3, 2, 2),))
    assert check  # the same model against itself: in step, from the same state, whatever the probes ran


# -- torch.export's guards and signatures are kept -------------------------------------------------------------------


class BatchBranch(nn.Module):
    def __init__(self, branch: bool = True):
        super().__init__()
        self.branch = branch
        self.conv, self.fc = nn.Conv2d(3, 4, 1), nn.Linear(16, 5)

    def forward(self, x):
        y = self.fc(torch.flatten(torch.relu(self.conv(x)), 1))
        if self.branch:
            return y.softmax(-1) if y.shape[0] == 1 else y
        return y


def test_a_forward_that_branches_on_batch_one_is_refused_there_not_run_through_the_other_branch():
    model = BatchBranch().eval()
    res = l2c(model, torch.randn(4, 3, 2, 2))  # auto picks export, traced for batches >= 2
    assert res.frontend == "export" and res.rewritten
    assert res.validation.batch_sizes == (2, 4, 5)  # the lowest batch the graph admits is covered
    assert any("refuses batches 0 and 1" in n for n in res.notes)
    from fxsurgery._runtime import OutsideExportedRange

    with pytest.raises(OutsideExportedRange, match="traced this graph for sizes 2 or more"):
        res.module(torch.randn(1, 3, 2, 2))
    x = torch.randn(3, 3, 2, 2)
    torch.testing.assert_close(res.module(x), model(x))


def test_a_batch_one_example_of_a_branching_forward_is_exported_at_batch_one():
    model = BatchBranch().eval()
    res = l2c(model, torch.randn(1, 3, 2, 2), frontend="export")
    x = torch.randn(1, 3, 2, 2)
    torch.testing.assert_close(res.module(x), model(x))  # probabilities, as the original gives at batch 1
    from fxsurgery._runtime import OutsideExportedRange

    with pytest.raises(OutsideExportedRange):
        res.module(torch.randn(2, 3, 2, 2))


@pytest.mark.parametrize("n", [1, 4])
def test_a_forward_that_does_not_branch_still_takes_batch_one_and_an_empty_batch(n):
    model = BatchBranch(branch=False).eval()
    res = l2c(model, torch.randn(n, 3, 2, 2), frontend="export")
    assert 1 in res.validation.batch_sizes  # the edge, compared against the original
    for batch in (0, 1, 3):
        x = torch.randn(batch, 3, 2, 2)
        torch.testing.assert_close(res.module(x), model(x))


class Tokens(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(16, 32), nn.Linear(32, 16)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_the_program_out_keeps_every_dynamic_dim_of_the_program_in():
    from torch.export import Dim

    model = Tokens().eval()
    ep = torch.export.export(model, (torch.randn(2, 6, 16),), dynamic_shapes=({0: Dim.AUTO, 1: Dim("seq")},))
    res = l2c(ep, None, token_layout=True)
    assert len(res.rewritten) == 2
    for shape in ((3, 9, 16), (5, 2, 16)):
        x = torch.randn(shape)
        torch.testing.assert_close(res.program.module()(x), model(x))
    maps = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    ep = torch.export.export(maps, (torch.randn(2, 3, 5, 6),), dynamic_shapes=({0: Dim.AUTO, 2: Dim.AUTO,
                                                                                3: Dim.AUTO},))  # fmt: skip
    res = c2l(ep, None)
    x = torch.randn(3, 3, 7, 4)
    torch.testing.assert_close(res.program.module()(x), maps(x))


def test_the_program_out_takes_the_keyword_inputs_the_program_in_takes():
    T = pytest.importorskip("transformers")
    config = T.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=64, num_labels=3)  # fmt: skip
    torch.manual_seed(0)
    bert = T.BertForSequenceClassification(config).eval()
    ids, mask = torch.randint(0, 100, (2, 8)), torch.ones(2, 8, dtype=torch.long)
    from torch.export import Dim

    dims = {"input_ids": {0: Dim.AUTO, 1: Dim.AUTO}, "attention_mask": {0: Dim.AUTO, 1: Dim.AUTO}}
    ep = torch.export.export(bert, (), kwargs={"input_ids": ids, "attention_mask": mask}, dynamic_shapes=dims,
                             strict=False)  # fmt: skip
    res = l2c(ep, None, token_layout=True)
    assert len(res.rewritten) == 12
    ids, mask = torch.randint(0, 100, (3, 11)), torch.ones(3, 11, dtype=torch.long)
    mask[0, 7:] = 0
    with torch.no_grad():
        want = bert(input_ids=ids, attention_mask=mask).logits
        got = res.program.module()(input_ids=ids, attention_mask=mask).logits  # by name, another batch and length
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_a_range_the_model_asserts_is_a_range_the_rewritten_graph_checks():
    class Capped(Tokens):
        def forward(self, x):
            torch._check(x.shape[0] <= 8)
            return super().forward(x)

    model = Capped().eval()
    res = l2c(model, torch.randn(4, 5, 16), frontend="export", token_layout=True)
    from fxsurgery._runtime import OutsideExportedRange

    with pytest.raises(OutsideExportedRange, match="for sizes 0 to 8"):
        res.module(torch.randn(9, 5, 16))
    x = torch.randn(8, 5, 16)
    torch.testing.assert_close(res.module(x), model(x))


def test_the_cli_saves_the_program_out_with_the_dynamic_dims_of_the_pt2_in(tmp_path):
    from torch.export import Dim

    model = Tokens().eval()
    ep = torch.export.export(model, (torch.randn(2, 6, 16),), dynamic_shapes=({0: Dim.AUTO, 1: Dim("seq")},))
    torch.export.save(ep, str(tmp_path / "tokens.pt2"))
    proc = cli("rewrite", str(tmp_path / "tokens.pt2"), "--to", "conv", "--token-layout", "--out",
               str(tmp_path / "out"), "--quiet", "--artifacts", "pt2")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    x = torch.randn(3, 9, 16)
    torch.testing.assert_close(torch.export.load(str(tmp_path / "out" / "rewritten.pt2")).module()(x), model(x))


def test_a_program_whose_layer_holds_an_extra_parameter_keeps_it():
    """PT2E's folded-BatchNorm bias lives on the conv's holder; rebuilding the holder as a Conv2d dropped it
    (``'Conv2d' object has no attribute 'weight_bias'``) and the error blamed the model."""

    class Folded(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.conv.register_parameter("weight_bias", nn.Parameter(torch.randn(4)))
            self.fc = nn.Linear(4 * 4 * 4, 5)

        def forward(self, x):
            y = self.conv(x) + self.conv.weight_bias.view(1, -1, 1, 1)
            return self.fc(y.flatten(1))

    model = Folded().eval()
    x = torch.randn(2, 3, 4, 4)
    res = fxsurgery.linear_to_conv(torch.export.export(model, (x,)), x)
    assert [s.name for s in res.rewritten] == ["fc"]
    torch.testing.assert_close(res.program.module()(x), model(x))


def test_a_buffer_expanded_from_one_row_survives_shape_propagation_and_validation():
    """An expanded tensor cannot be written to; the buffers are put back only where a forward changed them."""

    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("mask", torch.ones(1, 16).expand(2, 16))
            self.fc = nn.Linear(16, 4)

        def forward(self, x):
            return self.fc((x * self.mask).view(2, 16, 1, 1).flatten(1))

    model = Masked().eval()
    x = torch.randn(2, 16)
    res = fxsurgery.linear_to_conv(model, x)
    assert res.validation and model.mask.stride() == (0, 1)
