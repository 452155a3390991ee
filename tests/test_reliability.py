"""Second round of hostile cases: the rewrite never changes the user's objects, keeps per-module flags, hooks,
buffers and grad-mode regions, never passes silently where the original's behaviour depends on the traced mode, and
says what is wrong in words a user can act on. Each case is a model a user could write."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxsurgery
from tests.conftest import run_surgery

l2c, c2l = fxsurgery.linear_to_conv, fxsurgery.conv_to_linear


class Head(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Linear(4 * 4 * 4, 5)

    def forward(self, x):
        return self.fc(self.bn(self.conv(x)).flatten(1))


def test_channels_last_checkpoints_round_trip_through_a_copied_kernel():
    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 5, 4)).eval().to(memory_format=torch.channels_last)
    res = c2l(m, torch.randn(2, 3, 4, 4))
    state = fxsurgery.original_state_dict(res.module)
    assert torch.equal(state["1.weight"], m[1].weight)  # the copied kernel maps back exactly
    fresh = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 5, 4)).eval()
    fxsurgery.load_state_dict(res.module, fresh.state_dict())
    x = torch.randn(2, 3, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(res.module(x), fresh(x), rtol=1e-5, atol=1e-6)


def test_every_module_keeps_its_own_training_flag():
    m = Head().train()
    m.bn.eval()
    res = l2c(m, torch.randn(2, 3, 4, 4))
    assert res.module.training and not res.module.bn.training
    assert m.training and not m.bn.training  # and the user's model is as it was


class TrainingBranch(Head):
    def forward(self, x):
        y = self.conv(x).flatten(1)
        if self.training:
            y = y * 0.5
        return self.fc(y)


def test_a_training_branch_is_frozen_and_checked_at_run_time():
    m = TrainingBranch().eval()
    res = l2c(m, torch.randn(2, 3, 4, 4))
    assert res.rewritten  # exact in the traced (eval) mode
    res.module.train()
    with pytest.raises(RuntimeError, match="traced in eval mode and the forward of TrainingBranch branches on"):
        res.module(torch.randn(2, 3, 4, 4))


def test_a_train_mode_model_with_a_training_branch_names_the_real_cause():
    with pytest.raises(fxsurgery.InputError, match="in training mode and the forward of TrainingBranch branches on"):
        l2c(TrainingBranch().train(), torch.randn(2, 3, 4, 4))
    res = l2c(TrainingBranch().train(), torch.randn(2, 3, 4, 4), validate=False)
    assert res.rewritten and res.module.training  # specialised to training mode, as asked


class NoGradBackbone(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone, self.head = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 1)

    def forward(self, x):
        with torch.no_grad():
            y = self.backbone(x)
        return self.head(y)


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_grad_mode_regions_are_kept(frontend):
    """fx keeps the module's code (a note says why); torch.export records the region in the graph."""
    m = nn.Sequential(NoGradBackbone())
    res = c2l(m, torch.randn(2, 3, 5, 5), frontend=frontend)
    if frontend == "fx":
        assert any("uses no_grad" in n for n in res.notes), res.notes
    else:
        assert [s.name for s in res.rewritten] == ["0.head"]
    res.module(torch.randn(2, 3, 5, 5)).sum().backward()
    grads = {n: p.grad is not None for n, p in res.module.named_parameters()}
    assert grads == {"0.backbone.weight": False, "0.backbone.bias": False, "0.head.weight": True,
                     "0.head.bias": True}  # fmt: skip


def test_a_hook_on_a_flatten_still_runs_and_sees_the_flattened_value():
    seen = []
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(64, 5)).eval()
    m[1].register_forward_hook(lambda mod, args, out: seen.append(tuple(out.shape)))
    res = l2c(m, torch.randn(2, 3, 6, 6))
    assert "hooks that must see" in res.sites[0].reason
    seen.clear()
    res.module(torch.randn(2, 3, 6, 6))
    assert seen == [(2, 64)]


def test_a_hook_between_rewritten_convs_sees_the_original_layout():
    seen = []
    m = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 4, 1)).eval()
    m[1].register_forward_hook(lambda mod, args, out: seen.append(tuple(out.shape)))
    res = c2l(m, torch.randn(2, 3, 6, 7))
    assert len(res.rewritten) == 2
    seen.clear()
    res.module(torch.randn(2, 3, 6, 7))
    assert seen == [(2, 4, 6, 7)]


def test_a_hooked_block_stays_a_called_module_and_is_rewritten_inside():
    calls = []
    block = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 4, 1))
    block.register_forward_hook(lambda mod, args, out: calls.append(tuple(out.shape)))
    m = nn.Sequential(block, nn.Conv2d(4, 2, 3)).eval()
    res = c2l(m, torch.randn(2, 3, 6, 7))
    assert sorted(s.name for s in res.rewritten) == ["0.0", "0.2"]
    calls.clear()
    res.module(torch.randn(2, 3, 6, 7))
    assert calls == [(2, 4, 6, 7)]


def test_extra_buffers_of_a_rewritten_layer_are_kept():
    m = Head().eval()
    m.fc.register_buffer("act_scale", torch.tensor(3.0))
    res = l2c(m, torch.randn(2, 3, 4, 4))
    assert [s.name for s in res.rewritten] == ["fc"]
    assert torch.equal(res.module.state_dict()["fc.act_scale"], torch.tensor(3.0))
    fxsurgery.load_state_dict(res.module, m.state_dict())  # every key has a place


class Counting(Head):
    def forward(self, x):
        self.calls = getattr(self, "calls", 0) + 1
        self.last = x
        return super().forward(x)


def test_tracing_never_runs_the_users_module():
    m = Counting().eval()
    l2c(m, torch.randn(2, 3, 4, 4), validate=False)
    assert not hasattr(m, "calls") and not hasattr(m, "last")


def test_validation_never_writes_to_the_users_parameters():
    class Embed(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.fc = nn.Embedding(50, 4, max_norm=1.0), nn.Linear(8 * 4, 3)

        def forward(self, ids):
            return self.fc(self.emb(ids).unsqueeze(-1).flatten(1))

    torch.manual_seed(0)
    m = Embed().eval()
    with torch.no_grad():
        m.emb.weight.mul_(10)  # rows far above max_norm: a forward would renormalise them in place
    before = m.emb.weight.detach().clone()
    l2c(m, torch.randint(0, 50, (2, 8)))
    assert torch.equal(m.emb.weight, before)


class WritesInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        x.mul_(0.5)
        return self.conv(x)


def test_auto_and_check_never_change_the_callers_inputs(tmp_path):
    x = torch.randn(2, 3, 4, 4)
    before = x.clone()
    fxsurgery.rewrite(WritesInput().eval(), x, "auto", runtime="torch")
    assert torch.equal(x, before)
    fxsurgery.check(WritesInput().eval(), x, to="linear", out_dir=tmp_path, exporter="torchscript")
    assert torch.equal(x, before)


def test_an_in_place_op_on_the_users_input_before_a_flatten_head_is_left_alone():
    m = nn.Sequential(nn.Flatten(), nn.ReLU(inplace=True), nn.Linear(12, 3)).eval()
    x = torch.randn(2, 2, 2, 3).to(memory_format=torch.channels_last)
    before = x.clone()
    res = l2c(m, x)
    assert "writes in place" in res.sites[0].reason
    res.module(x)
    assert torch.equal(x, before)  # the original's flatten copied: neither model writes to x


def test_a_linear_whose_weight_is_a_buffer_is_skipped_with_the_reason():
    m = Head().eval()
    w = m.fc.weight.detach().clone()
    del m.fc.weight
    m.fc.register_buffer("weight", w)
    res = l2c(m, torch.randn(2, 3, 4, 4))
    assert "not an nn.Parameter" in res.sites[0].reason


def test_a_parametrized_layer_inside_an_attention_is_skipped():
    from torch.nn.utils import parametrizations

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm, self.attn = nn.LayerNorm(8), nn.MultiheadAttention(8, 2, batch_first=True)
            parametrizations.weight_norm(self.attn.out_proj)

        def forward(self, x):
            h = self.norm(x)
            return self.attn(h, h, h, need_weights=False)[0]

    res = l2c(Attn().eval(), torch.randn(2, 5, 8), token_layout=True)
    assert "attn.out_proj is parametrized" in {s.name: s.reason for s in res.sites}["attn"]


def test_torch_compile_is_unwrapped_and_said():
    m = Head().eval()
    res = l2c(torch.compile(m), torch.randn(2, 3, 4, 4))
    assert [s.name for s in res.rewritten] == ["fc"]
    assert any("torch.compile" in n for n in res.notes)


def test_an_output_that_ignores_the_input_is_noted():
    m = Head().eval()
    with torch.no_grad():
        m.fc.weight.zero_()
    res = l2c(m, torch.randn(2, 3, 4, 4))
    assert any("do not depend on the input" in n for n in res.validation.notes)


def test_complex_models_are_proved_in_complex128():
    m = nn.Sequential(nn.Conv2d(3, 4, 1)).to(torch.complex64).eval()
    x = torch.randn(2, 3, 4, 4, dtype=torch.complex64)
    assert c2l(m, x).validation.passed
    proof = c2l(m, x, precision="float64")
    assert proof.validation.passed and proof.validation.max_rel_error < 1e-12


def test_a_meta_model_with_inputs_elsewhere_says_where_the_inputs_must_be():
    class Unfoldable(nn.Module):  # a model fake tensors cannot run across devices
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(12, 3)

        def forward(self, x):
            return self.fc(torch.cat([x, torch.zeros_like(x)], 1).flatten(1)[:, :12])

    with torch.device("meta"):
        m = Unfoldable()
    with pytest.raises(fxsurgery.InputError, match="inputs are on cpu but the model's parameters are on meta: pass"):
        l2c(m, torch.randn(2, 3, 2, 2), validate=False)
    res = l2c(m, torch.empty(2, 3, 2, 2, device="meta"), validate=False)
    assert res.sites


def test_names_that_match_nothing_are_errors_with_the_nearest_names():
    m = Head().eval()
    with pytest.raises(fxsurgery.InputError, match="'fx' matches no module or site of the model; nearest: fc"):
        l2c(m, torch.randn(2, 3, 4, 4), exclude=["fx"])
    with pytest.raises(fxsurgery.InputError, match="sequence of names, got the string 'fc'"):
        l2c(m, torch.randn(2, 3, 4, 4), exclude="fc")
    with pytest.raises(fxsurgery.InputError, match="sequence of names"):
        l2c(m, torch.randn(2, 3, 4, 4), leaf_modules="conv")
    with pytest.raises(fxsurgery.InputError, match="did you mean 'exclude'"):
        l2c(m, torch.randn(2, 3, 4, 4), exlcude=["fc"])


def test_a_keyword_call_is_an_ordinary_call():
    class Keyword(Head):
        def forward(self, x):
            return self.fc(input=self.conv(x).flatten(1))

    run_surgery("linear_to_conv", Keyword().eval(), torch.randn(2, 3, 4, 4), rewritten=["fc"])


class Branchy(nn.Module):
    """An untraceable root (it branches on a shape) with a conv child whose attributes it reads."""

    def __init__(self):
        super().__init__()
        self.conv, self.pw, self.proj = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 1), nn.Conv2d(4, 2, 4)

    def forward(self, x):
        pad = self.conv.stride[0] - 1
        if x.shape[-1] > 100:
            return x
        y = self.pw(F.pad(self.conv(x), (pad, pad)))
        return self.proj(y)


def test_children_of_an_untraceable_root_keep_what_the_parent_reads_and_every_candidate_is_listed():
    m = Branchy().eval()
    res = c2l(m, torch.randn(2, 3, 4, 4), frontend="fx")
    sites = {s.name: s for s in res.sites}
    assert set(sites) == {"pw", "proj"}  # both candidates listed; the 3x3 conv is not one
    assert all("called directly by code that cannot be traced" in s.reason for s in sites.values())
    assert type(res.module.conv) is nn.Conv2d  # nothing rewritten in it: left as it was
    by_export = c2l(m, torch.randn(2, 3, 4, 4))  # frontend="auto": torch.export reaches both
    assert by_export.frontend == "export" and {s.name for s in by_export.rewritten} == {"pw", "proj"}


def test_modules_and_buffers_the_forward_does_not_use_are_kept():
    class Aux(Head):
        def __init__(self):
            super().__init__()
            self.aux = nn.Sequential(nn.Linear(64, 2))  # used only by a training loss
            self.register_buffer("loss_weight", torch.ones(5))

    m = Aux().eval()
    res = l2c(m, torch.randn(2, 3, 4, 4))
    assert sorted(fxsurgery.original_state_dict(res.module)) == sorted(m.state_dict())
    fxsurgery.load_state_dict(res.module, m.state_dict())  # strict: every key has its place


def test_dict_subclass_outputs_keep_their_type():
    from collections import OrderedDict

    class Output(OrderedDict):  # what HuggingFace's ModelOutput is, without the library
        pass

    class WithOutput(Head):
        def forward(self, x):
            h = self.conv(x)
            return Output(logits=self.fc(h.flatten(1)), hidden=h)

    m = WithOutput().eval()
    res = l2c(m, torch.randn(2, 3, 4, 4), precision="float64")
    out = res.module(torch.randn(2, 3, 4, 4))
    assert type(out) is Output and list(out) == ["logits", "hidden"] and [s.name for s in res.rewritten] == ["fc"]


def test_the_culprit_search_halves_instead_of_rewriting_once_per_site():
    import dataclasses

    from fxsurgery.rules import linear_to_conv
    from fxsurgery.rules.linear_to_conv.flatten_head import FlattenHead

    class Chain(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(4 * 2 * 2, 8)
            self.layers = nn.Sequential(*[nn.Linear(8, 8) for _ in range(15)])

        def forward(self, x):
            return self.layers(self.head(x.flatten(1)))

    class CountRuns:
        def __init__(self):
            self.rewriters = set()

        def propagate(self, node, rw):
            self.rewriters.add(id(rw))
            return False

    def wrong(weight, feature, order=None):
        c, h, w = feature
        return weight.view(weight.shape[0], h, w, c).permute(0, 3, 1, 2)

    counter = CountRuns()
    rules = linear_to_conv.rule_set()
    swapped = tuple(FlattenHead(weight_map=wrong) if isinstance(r, FlattenHead) else r for r in rules.rules)
    rules = dataclasses.replace(rules, rules=swapped, propagators=(counter, *rules.propagators))
    with pytest.raises(fxsurgery.ValidationError) as info:
        l2c(Chain().eval(), torch.randn(2, 4, 2, 2), rules=rules)
    assert info.value.sites == ("head",)
    # 16 sites: the pass, the graph with no site rewritten (is the graph itself at fault?), then at most two halves
    # per level
    assert len(counter.rewriters) <= 2 + 2 * 4


def test_the_size_guard_says_when_the_original_accepts_the_size():
    m = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.Flatten(), nn.Linear(64, 5)).eval()
    res = l2c(m, torch.randn(2, 3, 8, 8))
    assert m(torch.randn(2, 3, 16, 4)).shape == (2, 5)  # same element count: the original runs
    with pytest.raises(RuntimeError, match="exact only at the traced size \\(the original accepts this one\\)"):
        res.module(torch.randn(2, 3, 16, 4))
    with pytest.raises(RuntimeError, match="the original model rejects this input size too"):
        res.module(torch.randn(2, 3, 16, 16))
    with pytest.raises(RuntimeError):
        m(torch.randn(2, 3, 16, 16))  # as the message says


def test_a_weight_tied_across_an_untraceable_parent_stays_tied():
    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4 * 2 * 2, 10, bias=False)

        def forward(self, x):
            return self.proj(x.flatten(1))

    class Tied(nn.Module):  # GPT-2-like: the output layer shares the embedding's table; the root branches on x
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 16)
            self.conv = nn.Conv2d(3, 4, 1)
            self.head = Head()
            self.head.proj.weight = self.embed.weight

        def forward(self, x, ids):
            if ids.sum() < 0:
                return x
            return self.head(self.conv(x)) + self.embed(ids).sum(-1)

    m = Tied().eval()
    res = l2c(m, (torch.randn(2, 3, 2, 2), torch.randint(0, 10, (2, 10))))
    assert "shared with embed (tied weights)" in {s.name: s.reason for s in res.sites}["head.proj"]
    assert len(list(res.module.parameters())) == len(list(m.parameters()))  # the tie is still one parameter


@pytest.mark.parametrize("batch_layout", ["spatial", "batch"])
@pytest.mark.parametrize(
    "head",
    [
        lambda: nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Flatten(), nn.Linear(256, 5)),
        lambda: nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.Flatten(), nn.Linear(64, 7), nn.Softmax(1),
                              nn.Linear(7, 5)),  # fmt: skip
        lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 6), nn.GELU(),
                              nn.Linear(6, 5)),  # fmt: skip
    ],
    ids=["flatten", "flatten-hw-chain", "pooled-chain"],
)
def test_an_empty_batch_at_run_time_gives_an_empty_output(head, batch_layout):
    m = head().eval()
    res = l2c(m, torch.randn(2, 3, 8, 8), batch_layout=batch_layout)
    assert res.rewritten
    for n in (0, 1, 3):
        x = torch.randn(n, 3, 8, 8)
        torch.testing.assert_close(res.module(x), m(x), rtol=1e-5, atol=1e-6)
    assert res.module(torch.randn(0, 3, 8, 8)).shape == (0, 5)
