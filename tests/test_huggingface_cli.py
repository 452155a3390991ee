"""The HuggingFace front door of the command line: a local model folder (``save_pretrained``: config.json and
weights) as MODEL, with ``--task`` as optimum-cli takes it; example inputs made from the config; ONNX files whose
inputs and outputs are named as the model's (``input_ids``, ``attention_mask``, ``logits``) with dynamic batch and
sequence axes; and a Hub id refused in one line where there is no network."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf") / "bert"
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, num_labels=3,
                                     architectures=["BertForSequenceClassification"])  # fmt: skip
    torch.manual_seed(0)
    transformers.BertForSequenceClassification(config).save_pretrained(folder)
    return folder


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fxsurgery", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=900, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})  # fmt: skip


@pytest.fixture(scope="module")
def out(bert_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("hf-out") / "out"
    proc = _cli("rewrite", str(bert_dir), "--task", "text-classification", "--to", "conv", "--token-layout",
                "--target", "onnxruntime", "--artifacts", "onnx,pt2", "--out", str(out), "--quiet")  # fmt: skip
    assert proc.returncode == 0, proc.stderr + proc.stdout
    return out


def _io(path: Path) -> tuple[list, list]:
    import onnx

    graph = onnx.load(str(path)).graph
    dims = lambda v: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]  # noqa: E731
    return [(i.name, dims(i)) for i in graph.input], [(o.name, dims(o)) for o in graph.output]


def test_a_local_folder_is_rewritten_with_inputs_made_from_its_config(out):
    data = json.loads((out / "report.json").read_text())
    assert data["passed"] and data["validation"]["passed"] and data["onnx"]["passed"]
    assert len([s for s in data["sites"] if s["status"] == "rewritten"]) == 12  # 6 Linears in each of 2 layers
    assert [(i["name"], i["shape"], i["dtype"]) for i in data["inputs"]] == [
        ("input_ids", [2, 16], "int64"),
        ("attention_mask", [2, 16], "int64"),
    ]


def test_the_onnx_files_have_named_inputs_and_outputs_and_dynamic_batch_and_sequence(out, bert_dir):
    import onnxruntime as ort

    for name in ("original", "rewritten"):
        inputs, outputs = _io(out / f"{name}.onnx")
        assert inputs == [("input_ids", ["batch", "sequence"]), ("attention_mask", ["batch", "sequence"])], name
        assert [o[0] for o in outputs] == ["logits"] and outputs[0][1][1] == 3, name
    model = transformers.AutoModelForSequenceClassification.from_pretrained(bert_dir).eval()
    ids = torch.randint(0, 100, (3, 11), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(3, 11, dtype=torch.long)
    mask[2, 7:] = 0
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits.numpy()
    session = ort.InferenceSession(str(out / "rewritten.onnx"))  # another batch and another sequence length
    (got,) = session.run(["logits"], {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_without_task_the_architecture_the_config_names_is_loaded(bert_dir):
    proc = _cli("list", str(bert_dir), "--to", "conv", "--token-layout", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert "would rewrite 12" in proc.stdout


def test_a_hub_id_without_network_is_one_line(tmp_path):
    proc = _cli("rewrite", "some-org/some-model", "--task", "text-classification", "--to", "conv", "--out",
                str(tmp_path / "o"))  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("fxsurgery: error:")]
    assert "some-org/some-model is not a folder here" in line and "hf download some-org/some-model" in line


def test_task_on_a_model_factory_is_refused(tmp_path):
    proc = _cli("rewrite", "fxsurgery.models:demo_model", "--task", "text-classification", "--input-shape",
                "1,3,32,32", "--to", "conv", "--out", str(tmp_path / "o"))  # fmt: skip
    assert proc.returncode == 2 and "--task applies to a HuggingFace model" in proc.stderr


def test_the_report_draws_a_repeated_block_once_with_the_new_layout_s_shapes(out):
    data = json.loads((out / "report.json").read_text())
    page = (out / "report.html").read_text()
    layer0 = [s["name"] for s in data["sites"] if ".layer.0." in s["name"]]
    drawn = re_findall(r'<svg class="site-drawing" data-site="([^"]+)"', page)
    assert set(layer0) <= set(drawn) and not [n for n in drawn if ".layer.1." in n]  # layer 1 is layer 0 again
    assert page.count('<a class="shared">bert.encoder.layer.0.') == len(layer0)
    query = next(s for s in data["sites"] if s["name"].endswith("layer.0.attention.self.query"))
    site = next(n for n in query["subgraph"]["after"]["nodes"] if n["site"])
    assert site["shape"] == "2x32x1x16"  # the conv's output, (B, C, 1, S): the token layout drawn


def re_findall(pattern: str, text: str) -> list[str]:
    import re

    return re.findall(pattern, text)


def test_rewritten_pt2_loads_in_a_fresh_process_without_transformers(out):
    """transformers' SequenceClassifierOutput is not registered for loading a .pt2: the program's outputs are
    saved as a plain dict (report.json says so), and it loads and runs where transformers is not imported."""
    data = json.loads((out / "report.json").read_text())
    assert "plain dicts" in data["saved"]["rewritten.pt2"]
    script = (
        "import sys, torch; p = torch.export.load(sys.argv[1]); args, kwargs = p.example_inputs; "
        "out = p.module()(*args, **kwargs); print(sorted(out), tuple(out['logits'].shape), "
        "'transformers' in sys.modules)"
    )
    proc = subprocess.run([sys.executable, "-c", script, str(out / "rewritten.pt2")], capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split("\n")[-2] == "['logits'] (2, 3) False"


def test_model_kwargs_reach_from_pretrained(bert_dir):
    """``--model-kwargs`` are ``from_pretrained``'s: a head of another size than the checkpoint's is refused by
    transformers, in one line (and a value that is not a JSON object by fxsurgery)."""
    proc = _cli("list", str(bert_dir), "--to", "conv", "--model-kwargs", '{"num_labels": 5}', "--quiet")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "cannot load" in proc.stderr and "ignore_mismatched_sizes" in proc.stderr
    proc = _cli("list", str(bert_dir), "--to", "conv", "--model-kwargs", "[1]", "--quiet")
    assert proc.returncode == 2 and "--model-kwargs must be a JSON object of from_pretrained arguments" in proc.stderr
