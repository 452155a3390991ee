"""Every deployment target converts every kind of rewritten model fxsurgery claims: a CNN (both directions), a masked
BERT, a ViT and a Llama decoder in the token layout, each through the target's own toolchain (the op census of
``target=``), whose verdict must not be FAILED; where the toolchain converts the rewrite, the file it deploys
(``.pte``, OpenVINO IR, ``.mlpackage``) is written, loads, and (ExecuTorch, OpenVINO) runs to the original model's
outputs. Where the original itself does not convert, the verdict says so. A toolchain not installed skips its
column (``pip install "fxsurgery[openvino]"``, ``executorch``, ``coreml``)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
import torch
from torch import nn

import fxsurgery
from fxsurgery.models import demo_model
from fxsurgery.runtimes.census import census

TARGETS = {"onnxruntime": "onnxruntime", "openvino": "openvino", "executorch-xnnpack": "executorch",
           "coreml": "coremltools"}  # fmt: skip


class Logits(nn.Module):
    """A HuggingFace model called as deployments call it (its inputs by name), with its logits out."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x).logits


class MaskedLogits(Logits):
    def forward(self, ids, mask):
        return self.model(ids, attention_mask=mask).logits


def _bert():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, num_labels=3)  # fmt: skip
    ids, mask = torch.randint(0, 100, (2, 8)), torch.ones(2, 8, dtype=torch.long)
    mask[1, 5:] = 0  # one padded sequence
    return MaskedLogits(transformers.BertForSequenceClassification(config)), (ids, mask)


def _vit():
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(image_size=32, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=4, intermediate_size=64, num_labels=5)  # fmt: skip
    return Logits(transformers.ViTForImageClassification(config)), (torch.randn(1, 3, 32, 32),)


def _llama():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, use_cache=False)  # fmt: skip
    return Logits(transformers.LlamaForCausalLM(config)), (torch.randint(0, 100, (1, 8)),)


MODELS = {
    "cnn-to-conv": (lambda: (demo_model(), (torch.randn(1, 3, 32, 32),)), "linear_to_conv", {}),
    "cnn-to-linear": (lambda: (demo_model(), (torch.randn(1, 3, 32, 32),)), "conv_to_linear", {}),
    "masked-bert": (_bert, "linear_to_conv", {"token_layout": True}),
    "vit": (_vit, "linear_to_conv", {"token_layout": True}),
    "llama": (_llama, "linear_to_conv", {"token_layout": True}),
}


def _run_artifact(target: str, path, inputs: tuple) -> list[torch.Tensor] | None:
    """The deployed file loaded and run by its runtime (None where the runtime cannot run here: Core ML on Linux is
    loaded only)."""
    if target == "executorch-xnnpack":  # in a process of its own, as a deployment loads it
        torch.save(inputs, path.with_suffix(".inputs.pt"))
        script = (
            "import sys, torch; from executorch.runtime import Runtime; pte = open(sys.argv[1], 'rb').read(); "
            "program = Runtime.get().load_program(pte); method = program.load_method('forward'); "
            "torch.save([torch.as_tensor(t).clone() for t in method.execute(list(torch.load(sys.argv[2])))], "
            "sys.argv[3])"
        )
        argv = [sys.executable, "-c", script, str(path), str(path.with_suffix(".inputs.pt"))]
        proc = subprocess.run([*argv, str(path.with_suffix(".outputs.pt"))], capture_output=True, text=True,
                              timeout=600)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        return torch.load(path.with_suffix(".outputs.pt"))
    if target == "openvino":
        import openvino as ov

        model = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        result = model([t.numpy() for t in inputs])
        return [torch.as_tensor(result[out]) for out in model.outputs]
    if target == "coreml":
        import coremltools as ct

        assert ct.models.MLModel(str(path), skip_model_load=True).get_spec().WhichOneof("Type") == "mlProgram"
    return None


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("target", list(TARGETS))
def test_the_target_converts_the_rewritten_model(target, model_name, tmp_path):
    if importlib.util.find_spec(TARGETS[target]) is None:
        pytest.skip(f"{TARGETS[target]} is not installed (its fxsurgery extra)")
    build, direction, options = MODELS[model_name]
    torch.manual_seed(0)
    model, inputs = build()
    model.eval()
    res = fxsurgery.rewrite(model, inputs, direction, target=target, **options)
    assert res.rewritten and res.validation.passed, res.summary()
    out = census(target, model, res.module, inputs, out_dir=tmp_path)
    verdict = out["verdict"]
    assert "skipped" not in out and not verdict.startswith("FAILED"), (verdict, out["errors"])
    if out["original"] is None:  # the original does not convert either: said, not blamed on the rewrite
        assert "the original does not" in verdict or verdict.startswith("neither model converts"), verdict
        return
    assert out["rewritten"] is not None, out["errors"]
    if target == "onnxruntime":
        return  # its deployed file is the ONNX file check() writes (tests/verify/test_cross_check.py runs it)
    assert out["files"] == {"original": f"original{_suffix(target)}", "rewritten": f"rewritten{_suffix(target)}"}
    got = _run_artifact(target, tmp_path / out["files"]["rewritten"], inputs)
    if got is not None:
        with torch.no_grad():
            expected = model(*inputs)
        torch.testing.assert_close(got[0], expected, rtol=1e-3, atol=1e-4)


def _suffix(target: str) -> str:
    from fxsurgery.runtimes.registry import of_target

    return of_target(target).artifact
