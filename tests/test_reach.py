"""Reach, round 3: every Linear of the model is a listed site, Linear subclasses that compute a Linear are rewritten,
and encoder-decoders are captured with their cache, as users call them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxsurgery
from fxsurgery.rules import UNSEEN, WEIGHT_ONLY
from tests.conftest import moves


class ExplicitLinear(nn.Linear):
    """Falcon's ``FalconLinear``: its own forward, computing exactly what nn.Linear computes."""

    def forward(self, x):
        out = x @ self.weight.T
        return out if self.bias is None else out + self.bias


class ScaledLinear(nn.Linear):
    def forward(self, x):
        return 2 * super().forward(x)


class WithMethod(nn.Linear):
    def extra(self):
        return self.weight.sum()


def _head(fc: nn.Linear) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), fc).eval()


def _image():
    return torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_a_linear_subclass_computing_a_linear_is_rewritten_and_the_users_layer_keeps_its_class(frontend):
    model = _head(ExplicitLinear(64, 5))
    res = fxsurgery.linear_to_conv(model, _image(), frontend=frontend, precision="float64")
    assert [s.name for s in res.rewritten] == ["3"], res.summary()
    assert isinstance(res.module.get_submodule("3"), nn.Conv2d)
    assert res.validation.max_rel_error < 1e-12
    assert type(model[3]) is ExplicitLinear  # the user's model is not touched
    assert any("ExplicitLinear (1 layer(s))" in n for n in res.notes), res.notes
    torch.testing.assert_close(res.module(_image()), model(_image()))


@pytest.mark.parametrize(
    "fc, reason",
    [
        (ScaledLinear(64, 5), "does not compute x @ W.T + b"),
        (WithMethod(64, 5), "a Linear subclass that defines extra"),
    ],
    ids=["other-forward", "other-methods"],
)
def test_a_linear_subclass_that_is_not_a_plain_linear_is_listed_with_why_and_left(fc, reason):
    """torch.fx traces through it (torch.export too, where its F.linear is raised to a call of the layer and may be
    rewritten: what is around the F.linear stays in the graph)."""
    model = _head(fc)
    res = fxsurgery.linear_to_conv(model, _image(), frontend="fx")
    site = {s.name: s for s in res.sites}["3"]
    assert site.status == "skipped" and reason in site.reason and type(fc).__name__ in site.reason, res.summary()
    assert "traced through" in site.reason
    torch.testing.assert_close(res.module(_image()), model(_image()))


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x, *, scale=1.0):
        if x.sum() > 0:  # data-dependent control flow: fx cannot trace it
            x = x * scale
        return self.fc(x)


class Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = Untraceable()
        self.unused = nn.Linear(8, 8)
        self.proj, self.mat = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        y = self.inner(x, scale=2.0)  # a keyword argument: the submodule cannot be rewritten alone either
        # the layer computed by F.linear on its weight (the site is the layer), and a weight in a product of its own
        return torch.nn.functional.linear(y, self.proj.weight) + y @ self.mat.weight.t()


def test_every_linear_is_a_listed_site_even_where_the_pass_does_not_reach():
    model = Outer().eval()
    res = fxsurgery.linear_to_conv(model, torch.randn(2, 8), frontend="fx")
    reasons = {s.name: s.reason for s in res.skipped}
    names = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert names <= {s.name for s in res.sites}, res.summary()
    assert reasons["inner.fc"].startswith("inside inner, which was left untouched: "), reasons
    assert reasons["unused"] == UNSEEN
    assert reasons["mat"] == WEIGHT_ONLY
    assert reasons["proj"] == "input (inner) is not a flattened or pooled 4-D feature map"
    assert len(res.sites) == len(names), res.summary()  # F.linear on proj's weight is proj: listed once


class RowsMLP(nn.Module):
    """OPT's block: the MLP runs on rows ``(B*S, C)`` and is viewed back as tokens."""

    def __init__(self, c=16):
        super().__init__()
        self.inp, self.norm, self.out = nn.Linear(c, c), nn.LayerNorm(c), nn.Linear(c, c)
        self.fc1, self.fc2 = nn.Linear(c, 2 * c), nn.Linear(2 * c, c)

    def forward(self, x):
        b, s, c = x.shape
        rows = self.inp(x).reshape(-1, c)
        y = (rows + self.fc2(torch.relu(self.fc1(self.norm(rows))))).view(b, s, c)
        return self.out(y)


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_tokens_flattened_to_rows_stay_carried_through_the_mlp(frontend):
    model = RowsMLP().eval()
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(0))
    res = fxsurgery.linear_to_conv(model, x, token_layout=True, frontend=frontend, precision="float64")
    assert {s.name for s in res.rewritten} == {"inp", "fc1", "fc2", "out"}, res.summary()
    assert res.validation.max_rel_error < 1e-12
    moves = [n for n in res.module.graph.nodes if n.target in ("transpose", "permute", torch.permute)]
    assert len(moves) <= 2, res.module.code  # into the layout once, out once: none around the rows


class LayerNorm2dHead(nn.Module):
    """timm's ConvNeXt head: pooled map, LayerNorm2d (permute to channels-last, LayerNorm, permute back), flatten."""

    def __init__(self, c=12):
        super().__init__()
        self.conv, self.norm, self.fc = nn.Conv2d(3, c, 3), nn.LayerNorm(c), nn.Linear(c, 5)

    def forward(self, x):
        y = torch.nn.functional.adaptive_avg_pool2d(self.conv(x), 1)
        y = self.norm(y.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.fc(y.flatten(1))


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_a_channels_last_head_permuted_back_to_nchw_is_read_as_the_nchw_map(frontend):
    model = LayerNorm2dHead().eval()
    res = fxsurgery.linear_to_conv(model, _image(), frontend=frontend, precision="float64")
    conv = res.module.get_submodule("fc")
    assert isinstance(conv, nn.Conv2d) and (conv.in_channels, conv.kernel_size) == (12, (1, 1)), res.summary()
    assert res.validation.max_rel_error < 1e-12


class ViewAfter(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm, self.fc = nn.LayerNorm(16), nn.Linear(16, 16)

    def forward(self, x):
        x = x.transpose(1, 2).contiguous().transpose(1, 2)  # channels-first in memory: the conv's output is NCHW
        return self.fc(self.norm(x)).view(x.shape[0], -1)  # a view of the Linear's (contiguous) output


def test_a_view_of_a_value_converted_back_from_the_token_layout_still_runs():
    """The conversion back is a transpose, whose strides ``view`` cannot always merge: it becomes a reshape."""
    model = ViewAfter().eval()
    res = fxsurgery.linear_to_conv(model, torch.randn(2, 5, 16), token_layout=True, precision="float64")
    assert [s.name for s in res.rewritten] == ["fc"] and res.validation.max_rel_error < 1e-12


#: timm models, tiny: their options, input size, block Linears, and the moves (permutes and transposes) of the
#: rewritten graph, fx / export, against the original's (symbolic_trace)
_TIMM = {
    "vit_tiny_patch16_224": (dict(img_size=64, depth=2), 64, 8, (2, 3, 5)),
    "deit_tiny_patch16_224": (dict(img_size=64, depth=2), 64, 8, (2, 3, 5)),
    # EVA-02: q/k/v by F.linear on qkv's weight (the site keeps its name), interleaved rotary embedding, SwiGLU
    "eva02_tiny_patch14_224": (dict(img_size=56, depth=2), 56, 8, (2, 2, 5)),
    # Swin: window partition and reverse, cyclic shift, padding, relative-position bias, patch merging
    "swin_tiny_patch4_window7_224": (
        dict(img_size=56, depths=(2, 2), num_heads=(3, 6), embed_dim=48), 56, 17, (13, 13, 26)
    ),
}


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("arch", list(_TIMM))
def test_timm_attention_is_carried_per_head_with_fewer_transposes_than_the_original(arch, frontend):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    options, size, count, (fx_moves, export_moves, original) = _TIMM[arch]
    model = timm.create_model(arch, pretrained=False, num_classes=10, **options).eval()
    res = fxsurgery.linear_to_conv(model, torch.randn(2, 3, size, size), token_layout=True, frontend=frontend,
                                   precision="float64")  # fmt: skip
    blocks = {n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith(("blocks.", "layers."))}
    assert len(blocks) == count and blocks <= {s.name for s in res.rewritten}, res.summary()
    assert res.validation.max_rel_error < 1e-12
    expected = fx_moves if frontend == "fx" else export_moves
    assert moves(res.module) == expected < moves(torch.fx.symbolic_trace(model)) == original, res.module.code


T = pytest.importorskip("transformers")
from benchmarks.hf_models import block_linears, build  # noqa: E402  (needs transformers)


@pytest.mark.parametrize("family", ["bart", "t5"])
def test_encoder_decoders_are_captured_with_their_cache_and_return_it(family):
    model, x, blocks = build(family)
    res = fxsurgery.linear_to_conv(model, x, token_layout=True, precision="float64")
    assert res.frontend == "export"
    assert block_linears(model, blocks) <= {s.name for s in res.rewritten}, res.summary()
    assert res.validation.max_rel_error < 1e-12
    ids, kw = x
    out, ref = res.module(ids, **kw), model(ids, **kw)
    assert type(out) is type(ref) and type(out.past_key_values) is type(ref.past_key_values)  # EncoderDecoderCache
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-4, atol=1e-5)
    layer = ref.past_key_values.self_attention_cache.layers[0]
    got = out.past_key_values.self_attention_cache.layers[0]
    torch.testing.assert_close(got.keys, layer.keys, rtol=1e-4, atol=1e-5)  # the cache carries the same keys




def test_albert_shared_layer_is_rewritten_once_for_all_its_calls():
    """ALBERT calls one layer for every depth: each of its Linears becomes one conv called at every depth."""
    config = T.AlbertConfig(vocab_size=100, embedding_size=16, hidden_size=32, num_hidden_layers=3,
                            num_attention_heads=4, intermediate_size=64, num_labels=3)  # fmt: skip
    torch.manual_seed(0)
    model = T.AlbertForSequenceClassification(config).eval()
    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[0, 5:] = 0
    res = fxsurgery.linear_to_conv(model, (ids, {"attention_mask": mask}), token_layout=True, precision="float64")
    shared = block_linears(model, r"albert_layers\.0\.")
    assert len(shared) == 6 and shared <= {s.name for s in res.rewritten}, res.summary()
    assert all("(the same at each of its 3 calls)" in s.after and s.calls == 3 for s in res.rewritten if s.name in shared)
    assert res.validation.max_rel_error < 1e-12
    convs = [n for n in res.module.graph.nodes if n.op == "call_module" and n.target in shared]
    assert len(convs) == 18  # six convs, each called at the three depths
    torch.testing.assert_close(res.module(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits)


@pytest.fixture(scope="module")
def llama():
    model, (ids,), blocks = build("llama")
    res = fxsurgery.linear_to_conv(model, ids, token_layout=True, dynamic_sequence=True)
    assert block_linears(model, blocks) <= {s.name for s in res.rewritten}
    return model, ids, res


@pytest.mark.parametrize("prompt", [5, 11])
def test_the_rewritten_lm_generates_what_the_original_generates(llama, prompt):
    model, ids, res = llama
    lm = fxsurgery.generation_model(res, model, ids)
    assert isinstance(lm, type(model)) and lm.fxsurgery_graph is res.module
    x = torch.randint(1, 100, (2, prompt), generator=torch.Generator().manual_seed(prompt))  # 0 is the pad token
    greedy = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    torch.testing.assert_close(lm.generate(x, **greedy), model.generate(x, **greedy), rtol=0, atol=0)
    sampled = dict(max_new_tokens=8, do_sample=True, top_k=0, pad_token_id=0)
    torch.manual_seed(7)
    want = model.generate(x, **sampled)
    torch.manual_seed(7)
    assert torch.equal(lm.generate(x, **sampled), want)
    assert model.generation_config.use_cache  # the user's model keeps its settings


def test_a_graph_that_computes_another_model_is_refused_for_generation(llama):
    model, ids, res = llama
    other, _, _ = build("llama")
    with torch.no_grad():
        other.lm_head.weight.mul_(2)  # (a copy of its own: build makes a new model)
    with pytest.raises(fxsurgery.InputError, match=r"computes something else .*logits: max abs error"):
        fxsurgery.generation_model(res, other, ids)


def test_a_graph_specialised_to_one_length_is_refused_for_generation():
    model, (ids,), _ = build("llama")
    res = fxsurgery.linear_to_conv(model, ids, token_layout=True)  # the sequence traced static
    with pytest.raises(fxsurgery.InputError, match="dynamic_sequence=True"):
        fxsurgery.generation_model(res, model, ids)


@pytest.mark.parametrize("family", ["bart", "t5"])
def test_the_rewritten_encoder_decoder_generates_what_the_original_generates(family):
    model, x, _ = build(family)
    res = fxsurgery.linear_to_conv(model, x, token_layout=True, dynamic_sequence=True, validate=False)
    lm = fxsurgery.generation_model(res, model, x)
    settings = dict(max_new_tokens=6, min_new_tokens=6, decoder_start_token_id=2)  # (random weights: no early end)
    for prompt in (5, 11):
        ids = torch.randint(3, 100, (2, prompt), generator=torch.Generator().manual_seed(prompt))
        want = model.generate(ids, do_sample=False, **settings)
        assert want.shape == (2, 7)
        torch.testing.assert_close(lm.generate(ids, do_sample=False, **settings), want, rtol=0, atol=0)
    torch.manual_seed(7)
    want = model.generate(ids, do_sample=True, top_k=0, **settings)
    torch.manual_seed(7)
    assert torch.equal(lm.generate(ids, do_sample=True, top_k=0, **settings), want)


def test_the_rewritten_whisper_transcribes_what_the_original_transcribes():
    """Speech to text as users call it: audio features into the encoder (not token ids), Whisper's own generate()
    (its generation mixin around transformers')."""
    model, x, blocks = build("whisper")
    res = fxsurgery.linear_to_conv(model, x, token_layout=True, dynamic_sequence=True, precision="float64")
    assert block_linears(model, blocks) <= {s.name for s in res.rewritten}, res.summary()
    assert res.validation.max_rel_error < 1e-12
    lm = fxsurgery.generation_model(res, model, x)
    for seed, new in ((3, 4), (4, 9)):  # the decoder runs at every length up to 1 + new
        audio = torch.randn(x[0].shape, generator=torch.Generator().manual_seed(seed))
        settings = dict(max_new_tokens=new, min_new_tokens=new)
        want = model.generate(audio, do_sample=False, **settings)
        assert want.shape[1] >= new
        assert torch.equal(lm.generate(audio, do_sample=False, **settings), want)
        torch.manual_seed(7)
        want = model.generate(audio, do_sample=True, top_k=0, **settings)
        torch.manual_seed(7)
        assert torch.equal(lm.generate(input_features=audio, do_sample=True, top_k=0, **settings), want)


def test_mamba_is_captured_with_its_cache_and_its_generation_is_refused_with_why():
    """Mamba's cache is a DynamicCache of linear-attention layers (transformers' executorch flatten takes attention
    layers only: its exporter's flatten of any layer is registered first); its scan loops over the tokens in
    Python, so the graph holds the example's length."""
    # a model without transformers modules captured first (a fresh process): the registration must not depend on it
    fxsurgery.linear_to_conv(_head(nn.Linear(64, 5)), _image(), frontend="export", validate=False)
    model, x, blocks = build("mamba")
    res = fxsurgery.linear_to_conv(model, x, token_layout=True, dynamic_sequence=True, precision="float64")
    assert block_linears(model, blocks) <= {s.name for s in res.rewritten}, res.summary()
    dt = {s.name: s for s in res.skipped}["backbone.layers.0.mixer.dt_proj"]
    assert "reads its weight in an operation of its own" in dt.reason
    assert res.validation.max_rel_error < 1e-12
    out, ref = res.module(*x), model(*x)
    assert type(out) is type(ref) and type(out.cache) is type(ref.cache)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-4, atol=1e-5)
    with pytest.raises(fxsurgery.InputError, match="Mamba's scan.*pass {length: result"):
        fxsurgery.generation_model(res, model, x)


def test_a_model_that_fixes_its_length_generates_through_a_graph_per_length():
    """Mamba's graph holds the length it was captured at: rewritten at each length generation runs through, it
    generates the original's tokens (greedy and sampled); a step at a length without a graph is refused."""
    model, _, _ = build("mamba")
    prompt = torch.randint(1, 100, (2, 5), generator=torch.Generator().manual_seed(3))
    graphs = {
        n: fxsurgery.linear_to_conv(model, (torch.randint(1, 100, (2, n)),), token_layout=True, validate=False)
        for n in range(5, 9)
    }  # validate=False: generation_model compares each graph with the model at its length
    lm = fxsurgery.generation_model(graphs, model, (prompt,))
    want = model.generate(prompt, max_new_tokens=4, do_sample=False)
    assert torch.equal(lm.generate(prompt, max_new_tokens=4, do_sample=False), want)
    torch.manual_seed(5)
    want = model.generate(prompt, max_new_tokens=4, do_sample=True, top_k=0)
    torch.manual_seed(5)
    assert torch.equal(lm.generate(prompt, max_new_tokens=4, do_sample=True, top_k=0), want)
    with pytest.raises(fxsurgery.SurgeryError, match=r"runs on 9 tokens .* lengths \[5, 6, 7, 8\] only"):
        lm.generate(prompt, max_new_tokens=5, do_sample=False)
    with pytest.raises(fxsurgery.InputError, match="given for sequence length 7 does not run at that length"):
        fxsurgery.generation_model({5: graphs[5], 7: graphs[6]}, model, (prompt,))


def test_an_encoder_decoder_graph_without_the_decoder_input_is_refused_for_generation_with_why():
    model, (ids, kw), _ = build("bart")
    x = (ids, {"attention_mask": kw["attention_mask"]})  # BART decodes the prompt shifted right: no decoder input
    res = fxsurgery.linear_to_conv(model, x, token_layout=True, validate=False)
    with pytest.raises(fxsurgery.InputError, match="takes no decoder_input_ids"):
        fxsurgery.generation_model(res, model, x)


@pytest.mark.parametrize("implementation", ["eager", "batched_mm", "grouped_mm"])
def test_mixtral_experts_router_and_attention_are_rewritten_whatever_the_experts_dispatch(implementation):
    model, x, _ = build("mixtral")
    model.config._experts_implementation = implementation  # how transformers runs the routed experts
    res = fxsurgery.linear_to_conv(model, x, token_layout=True, precision="float64")
    assert not res.skipped, res.summary()  # attention, router (F.linear on the rows), experts, lm_head
    experts = {s.name for s in res.rewritten if s.pattern == "moe-experts"}
    assert experts == {"model.layers.0.mlp.experts", "model.layers.1.mlp.experts"}
    assert res.validation.passed and res.validation.max_rel_error < 1e-12
    torch.testing.assert_close(res.module(*x).logits, model(*x).logits, rtol=1e-4, atol=1e-5)  # as the user runs it
    state = fxsurgery.original_state_dict(res.module)  # the fused weights keep their names and shapes
    assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in model.state_dict().items()}


@pytest.mark.parametrize("layout", ["spatial", "batch"])
def test_dense_experts_export_to_onnx_and_onnxruntime_agrees(tmp_path, layout):
    model, x, _ = build("mixtral")
    model.config._experts_implementation = "batched_mm"  # the dispatch whose original exports to ONNX
    report = fxsurgery.check(model, x, to="conv", token_layout=True, batch_layout=layout, out_dir=tmp_path)
    assert report.onnx.passed, report.onnx.failures
    assert report.onnx.rewrite_visible, report.onnx.rewrite_detail  # each experts layer: 2 convs for 2 batched mms
    assert "for 15 rewritten call(s)" in report.onnx.rewrite_detail  # 11 one-call sites, 2 experts layers x 2 convs


@pytest.mark.parametrize("family", ["qwen2-moe", "olmoe", "deepseek-v3"])
def test_other_moe_families_are_rewritten_shared_experts_too(family):
    configs = {
        "qwen2-moe": None,
        "olmoe": lambda: T.OlmoeForCausalLM(T.OlmoeConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, intermediate_size=16, num_experts=4, num_experts_per_tok=2,
            eos_token_id=0, pad_token_id=0)),
        "deepseek-v3": lambda: T.DeepseekV3ForCausalLM(T.DeepseekV3Config(vocab_size=100, hidden_size=32,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, intermediate_size=64,
            moe_intermediate_size=16, n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
            first_k_dense_replace=1, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4,
            v_head_dim=8, n_shared_experts=1)),
    }  # fmt: skip
    torch.manual_seed(0)
    model = build(family)[0] if configs[family] is None else configs[family]().eval()
    x = (torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0)),)
    res = fxsurgery.linear_to_conv(model, x, token_layout=True)
    wanted = {n for n, m in model.named_modules() if type(m).__name__.endswith("Experts")}
    wanted |= {n for n, m in model.named_modules() if isinstance(m, nn.Linear) and "shared_expert" in n}
    assert wanted and wanted <= {s.name for s in res.rewritten}, res.summary()
    assert res.validation.passed


def test_siglip_attention_pooling_head_is_rewritten_and_right():
    config = T.SiglipVisionConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=64)  # fmt: skip
    torch.manual_seed(0)
    model = T.SiglipVisionModel(config).eval()
    res = fxsurgery.linear_to_conv(model, torch.randn(2, 3, 32, 32), token_layout=True)
    assert {"head.mlp.fc1", "head.mlp.fc2"} <= {s.name for s in res.rewritten}, res.summary()
    assert res.validation.passed
