"""HuggingFace models, built from small configs with random weights (no hub access) and called as users call them:
no crash, the original's output class, validation exact in float64, and with ``token_layout=True`` every Linear of
the attention and MLP blocks rewritten."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fxsurgery
from fxsurgery import _runtime

T = pytest.importorskip("transformers")
from benchmarks.hf_models import ZOO, block_linears, build  # noqa: E402  (needs transformers)

TRANSFORMERS = [name for name in ZOO if name not in ("resnet", "mobilenet_v2")]
DECODERS = ("llama", "mistral", "qwen2", "phi3", "gemma", "gpt2", "opt")


def _call(model, inputs):
    *args, kwargs = inputs if isinstance(inputs[-1], dict) else (*inputs, {})
    return model(*args, **kwargs)


@pytest.mark.parametrize("family", TRANSFORMERS)
def test_token_layout_rewrites_every_linear_of_the_blocks(family):
    model, x, blocks = build(family)
    res = fxsurgery.linear_to_conv(model, x, token_layout=True, precision="float64")  # (Gemma's casts widened too)
    wanted = block_linears(model, blocks)
    assert wanted and wanted <= {s.name for s in res.rewritten}, res.summary()
    assert res.validation.passed and res.validation.max_rel_error < 1e-12
    for s in res.skipped:
        assert s.reason and "internal error" not in s.reason
    out, expected = _call(res.module, x), _call(model, x)
    assert type(out) is type(expected)
    ref = expected[0] if not isinstance(expected, torch.Tensor) else expected
    got = out[0] if not isinstance(out, torch.Tensor) else out
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


#: Falcon's fused multi-query q/k/v (``view(B, S, H + 2, D)``) and DeBERTa's disentangled attention (its scores add
#: content-to-position terms) are not carried per head: their attention runs on tokens. Mamba has no attention.
@pytest.mark.parametrize("family", [n for n in TRANSFORMERS if n not in ("convnext", "falcon", "deberta-v2", "mamba")])
def test_token_layout_runs_every_attention_per_head_without_converting_the_tokens_back(family):
    model, x, _ = build(family)
    res = fxsurgery.linear_to_conv(model, x, token_layout=True)
    nodes = [n for m in res.module.modules() if isinstance(m, torch.fx.GraphModule) for n in m.graph.nodes]
    per_head = sum(n.target is _runtime.attention_channels for n in nodes)
    calls = []  # each call of an attention layer (ALBERT calls one layer at every depth), counted on the original
    hooks = [m.register_forward_hook(lambda *_: calls.append(1)) for m in model.modules()
             if type(m).__name__.endswith(("Attention", "SelfAttention"))
             and not any(type(c).__name__.endswith("Attention") for c in m.children())]  # fmt: skip
    with torch.no_grad():
        _call(model, x)
    for h in hooks:
        h.remove()
    assert per_head == len(calls) > 0
    assert not any(n.target is torch.nn.functional.scaled_dot_product_attention for n in nodes)


_MOVES = {"transpose", "permute", torch.transpose, torch.permute}


def _moves_inside_blocks(res: fxsurgery.SurgeryResult, blocks: set[str]) -> list[torch.fx.Node]:
    """Transposes and permutes of values that depend on the model's input, between the first and the last layer of
    the blocks, other than those that convert a value back for an output (a KV cache the model returns)."""
    gm, dynamic = res.module, set()
    for n in gm.graph.nodes:
        if n.op == "placeholder" or any(i in dynamic for i in n.all_input_nodes):
            dynamic.add(n)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    layers = [order[n] for n in gm.graph.nodes if n.op == "call_module" and n.target in blocks]
    return [n for n in gm.graph.nodes if n.target in _MOVES and n.args[0] in dynamic
            and min(layers) < order[n] < max(layers) and not all(u.op == "output" for u in n.users)]  # fmt: skip


@pytest.mark.parametrize("family", DECODERS)
def test_decoder_blocks_run_in_the_token_layout_without_a_transpose(family):
    model, x, pattern = build(family)
    res = fxsurgery.linear_to_conv(model, x, token_layout=True, frontend="export")
    blocks = block_linears(model, pattern)
    assert blocks <= {s.name for s in res.rewritten}
    # RMSNorm/LayerNorm, rotary embeddings, grouped-query heads and the causal attention run on the carried tokens
    # (B, C, 1, S) and heads (B, H, D, S); the KV cache the model returns is converted back for it
    moves = _moves_inside_blocks(res, blocks)
    assert not moves, [(n.name, n.args[0].name) for n in moves]
    assert _runtime.attention_channels in {n.target for n in res.module.graph.nodes}


@pytest.mark.parametrize("quantize", [None, "int8"])  # int8: SDPA itself on permuted views, the cache as it is
def test_a_decode_step_with_a_static_kv_cache_reads_the_cache_in_its_own_layout(quantize):
    from transformers import GenerationConfig
    from transformers.integrations.executorch import TorchExportableModuleWithStaticCache

    model, _, blocks = build("llama")
    model.generation_config = GenerationConfig(use_cache=True, cache_implementation="static",
                                               cache_config={"batch_size": 1, "max_cache_len": 16})  # fmt: skip
    step = TorchExportableModuleWithStaticCache(model).eval()  # transformers' ExecuTorch export recipe
    reference = copy.deepcopy(step)
    ids, position = torch.tensor([[5]]), torch.tensor([0])
    inputs = ({"input_ids": ids, "cache_position": position},)
    res = fxsurgery.linear_to_conv(step, inputs, token_layout=True, quantize=quantize)
    assert {f"model.{n}" for n in block_linears(model, blocks)} <= {s.name for s in res.rewritten}
    attention = [n for n in res.module.graph.nodes if n.target is _runtime.attention_channels]
    assert len(attention) == 2 and all(n.args[6:] == ("bhtd", "bhtd", quantize is not None) for n in attention)
    with torch.no_grad():  # a short generation, token by token, the caches of both filled as they go
        for pos, token in enumerate([3, 17, 42, 7, 99]):
            kw = {"input_ids": torch.tensor([[token]]), "cache_position": torch.tensor([pos])}
            torch.testing.assert_close(res.module(**kw), reference(**kw), rtol=1e-5, atol=1e-6)


def test_a_program_exported_with_a_dynamic_sequence_length_stays_dynamic():
    from torch.export import Dim

    model, (ids, kw), _ = build("bert")
    seq = Dim("seq", min=2, max=64)
    program = torch.export.export(model, (ids,), kw, strict=False, dynamic_shapes={
        "input_ids": {0: Dim.AUTO, 1: seq}, "attention_mask": {0: Dim.AUTO, 1: seq}})  # fmt: skip
    res = fxsurgery.linear_to_conv(program, None, token_layout=True)
    assert len(res.rewritten) == 12 and res.validation.passed
    for n, s in ((3, 5), (1, 13)):  # other batch sizes and sequence lengths than the example's (2, 8)
        i, mask = torch.randint(0, 100, (n, s)), torch.ones(n, s, dtype=torch.long)
        mask[0, -2:] = 0
        torch.testing.assert_close(res.module(i, mask).logits, model(i, attention_mask=mask).logits)


def test_eager_attention_is_carried_per_head_as_well():
    model, x, _ = build("bert")
    model.config._attn_implementation = "eager"  # the products and the softmax written out
    res = fxsurgery.linear_to_conv(model, x, token_layout=True, precision="float64")
    assert res.validation.max_rel_error < 1e-12
    nodes = [n for m in res.module.modules() if isinstance(m, torch.fx.GraphModule) for n in m.graph.nodes]
    assert sum(n.target is torch.einsum for n in nodes) == 2 * 2  # two products in each of the two layers
    assert not any(n.target is torch.matmul for n in nodes)


#: The slowest families (MobileNetV2's 38 pointwise convs; the encoder-decoders, whose token-layout rewrite is tested
#: above and whose default modes run in benchmarks/coverage-hf.md) run with -m slow.
SLOW_DEFAULTS = ("mobilenet_v2", "bart", "t5")


@pytest.mark.parametrize("family", [pytest.param(f, marks=pytest.mark.slow) if f in SLOW_DEFAULTS else f for f in ZOO])
def test_the_default_modes_never_break_the_model_and_list_every_pointwise_conv(family):
    model, x, _ = build(family)
    for surgery in (fxsurgery.linear_to_conv, fxsurgery.conv_to_linear):
        res = surgery(model, x)
        assert res.validation.passed
        assert type(_call(res.module, x)) is type(_call(model, x))
        assert all(s.reason and "internal error" not in s.reason for s in res.skipped), res.summary()
    pointwise = {n for n, m in model.named_modules()
                 if isinstance(m, (nn.Conv1d, nn.Conv2d)) and all(k == 1 for k in m.kernel_size)}  # fmt: skip
    assert pointwise <= {s.name for s in res.sites}, res.summary()  # every candidate listed, rewritten or not


def test_a_padding_mask_changes_the_output_and_the_rewrite_follows_it():
    model, (ids, kw), _ = build("bert")
    res = fxsurgery.linear_to_conv(model, (ids, kw), token_layout=True)
    full = torch.ones_like(kw["attention_mask"])
    masked, unmasked = res.module(ids, attention_mask=kw["attention_mask"]), res.module(ids, full)
    assert not torch.allclose(masked.logits, unmasked.logits)  # the mask is an input of the rewritten graph
    torch.testing.assert_close(masked.logits, model(ids, attention_mask=kw["attention_mask"]).logits)
    torch.testing.assert_close(unmasked.logits, model(ids, attention_mask=full).logits)


def test_gpt2_conv1d_weights_are_transposed_views_and_checkpoints_round_trip():
    model, x, _ = build("gpt2")
    res = fxsurgery.linear_to_conv(model, x, token_layout=True)
    conv = res.module.get_submodule("transformer.h.0.attn.c_attn")
    original = model.transformer.h[0].attn.c_attn.weight  # (in, out)
    assert isinstance(conv, nn.Conv2d) and conv.weight.shape == (96, 32, 1, 1)
    assert conv.weight.data_ptr() == original.data_ptr()  # a view of the transposed weight, no copy
    state = fxsurgery.original_state_dict(res.module)
    for key, value in model.state_dict().items():
        if key in state:
            assert torch.equal(state[key], value), key
    assert {s.name: s.reason for s in res.skipped}["lm_head"] == "weight shared with transformer.wte (tied weights)"


def test_segformer_pointwise_convs_become_linears():
    model, x, _ = build("segformer")
    res = fxsurgery.conv_to_linear(model, x, precision="float64")
    pointwise = {n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)}
    assert pointwise and pointwise <= {s.name for s in res.rewritten}, res.summary()
    assert res.frontend == "export" and res.validation.max_rel_error < 1e-12
