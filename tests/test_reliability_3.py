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
    readme = (ROOT / "README.md").read_text()
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
