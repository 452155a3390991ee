"""Streamed checkpoint conversion (fxsurgery.convert_checkpoint): a sharded safetensors checkpoint written by
transformers, converted for a model rewritten on the meta device, loaded with assign=True, gives the original's
outputs; converting back gives the original bytes."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import fxsurgery
from fxsurgery.artifacts.checkpoint import load_layouts, save_layouts
from fxsurgery.artifacts.convert import materialize
from fxsurgery.errors import InputError

T = pytest.importorskip("transformers")

_LLAMA = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=64, max_position_embeddings=64)  # fmt: skip


def _state(folder):
    state = {}
    for f in sorted(folder.glob("*.safetensors")):
        state.update(load_file(f))  # the safetensors library reads what convert_checkpoint wrote
    return state


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A small Llama saved by transformers in shards, and the same architecture rewritten on the meta device."""
    torch.manual_seed(0)
    config = T.LlamaConfig(**_LLAMA)
    original = T.LlamaForCausalLM(config).eval()
    src = tmp_path_factory.mktemp("llama")
    original.save_pretrained(src, max_shard_size="40KB")
    assert (src / "model.safetensors.index.json").is_file() and len(list(src.glob("*.safetensors"))) > 2
    with torch.device("meta"):
        empty = T.LlamaForCausalLM(config).eval()
    res = fxsurgery.linear_to_conv(empty, (torch.zeros(1, 8, dtype=torch.long, device="meta"),), validate=False,
                                   token_layout=True)  # fmt: skip
    return original, src, res


def test_a_sharded_checkpoint_converted_for_a_meta_rewrite_gives_the_original_outputs(llama, tmp_path):
    original, src, res = llama
    assert len(res.rewritten) == 2 * 7 + 1  # q, k, v, o, gate, up, down per block, and the LM head
    summary = fxsurgery.convert_checkpoint(res, src, tmp_path / "conv")
    assert summary["converted"] == len(res.rewritten) and summary["moved_bytes"] == 0  # Linear -> 1x1: same bytes
    index = json.loads((tmp_path / "conv" / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    assert (tmp_path / "conv" / "config.json").is_file()
    model = res.module
    model.load_state_dict(_state(tmp_path / "conv"), assign=True)
    filled = materialize(model, original)  # rotary inv_freq is not in checkpoints; device='meta' constants
    assert "model.rotary_emb.inv_freq" in filled and not any(t.is_meta for t in model.state_dict().values())
    ids = torch.randint(0, 100, (2, 8))
    torch.testing.assert_close(model(ids).logits, original(ids).logits, rtol=1e-4, atol=1e-5)


def test_converting_back_gives_the_original_tensors(llama, tmp_path):
    original, src, res = llama
    fxsurgery.convert_checkpoint(res, src, tmp_path / "conv")
    fxsurgery.convert_checkpoint(res, tmp_path / "conv", tmp_path / "back", to="original")
    back, expected = _state(tmp_path / "back"), _state(src)
    assert back.keys() == expected.keys()
    assert all(torch.equal(back[k], expected[k]) for k in expected)


def test_gpt2_conv1d_weights_move_and_round_trip(tmp_path):
    torch.manual_seed(0)
    model = T.GPT2LMHeadModel(T.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=16)).eval()
    model.save_pretrained(tmp_path / "src")
    ids = torch.randint(0, 50, (2, 6))
    res = fxsurgery.linear_to_conv(model, (ids,), token_layout=True)
    layouts = tmp_path / "layouts.json"
    save_layouts(res, layouts)
    assert load_layouts(layouts).keys() == {f"{s.name}.weight" for s in res.rewritten}
    summary = fxsurgery.convert_checkpoint(layouts, tmp_path / "src", tmp_path / "conv")
    assert summary["moved_bytes"] > 0  # Conv1D stores (in, out): its conv kernel is the transpose
    state = _state(tmp_path / "conv")
    fresh = fxsurgery.linear_to_conv(T.GPT2LMHeadModel(model.config).eval(), (ids,), token_layout=True).module
    fresh.load_state_dict({k: v for k, v in state.items() if k in fresh.state_dict()}, strict=False)
    torch.testing.assert_close(fresh(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-5)
    fxsurgery.convert_checkpoint(res, tmp_path / "conv", tmp_path / "back", to="original")
    back, expected = _state(tmp_path / "back"), _state(tmp_path / "src")
    assert all(torch.equal(back[k], expected[k]) for k in expected)


def test_bad_checkpoints_are_refused_with_the_reason(llama, tmp_path):
    _, src, res = llama
    fxsurgery.convert_checkpoint(res, src, tmp_path / "conv")
    with pytest.raises(InputError, match=r"has shape \(\d+, 32, 1, 1\), the original model's is \(\d+, 32\)"):
        fxsurgery.convert_checkpoint(res, tmp_path / "conv", tmp_path / "again")  # already converted
    with pytest.raises(InputError, match="exists and is not empty"):
        fxsurgery.convert_checkpoint(res, src, tmp_path / "conv")
    with pytest.raises(InputError, match="not found"):
        fxsurgery.convert_checkpoint(res, tmp_path / "nowhere", tmp_path / "x")
    single = tmp_path / "one" / "model.safetensors"
    single.parent.mkdir()
    from safetensors.torch import save_file

    save_file({"lm_head.weight": torch.zeros(100, 32)}, str(single))
    with pytest.raises(InputError, match="lacks 14 rewritten parameter"):
        fxsurgery.convert_checkpoint(res, single, tmp_path / "y")


def test_without_copy_file_range_the_bytes_are_the_same(llama, tmp_path, monkeypatch):
    _, src, res = llama
    fxsurgery.convert_checkpoint(res, src, tmp_path / "fast")
    monkeypatch.delattr("os.copy_file_range", raising=False)  # other systems: copied through Python in chunks
    fxsurgery.convert_checkpoint(res, src, tmp_path / "slow")
    for f in sorted((tmp_path / "fast").iterdir()):
        assert f.read_bytes() == (tmp_path / "slow" / f.name).read_bytes(), f.name


def _copy_checkpoint(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst, sorted(dst.glob("*.safetensors"))


def _nothing_written(dst):
    """No destination, and no staging folder beside it."""
    return not dst.exists() and not any(p.name.startswith(f".{dst.name}.partial") for p in dst.parent.iterdir())


def _no_hang(seconds=60):
    import signal

    def fail(*_):
        raise AssertionError(f"convert_checkpoint did not return within {seconds} s")

    signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)


@pytest.mark.parametrize("fast_copy", [True, False], ids=["copy_file_range", "python-chunks"])
def test_a_truncated_shard_is_an_error_naming_it_and_nothing_is_written(llama, tmp_path, monkeypatch, fast_copy):
    _, src, res = llama
    if not fast_copy:
        monkeypatch.delattr("os.copy_file_range", raising=False)
    folder, shards = _copy_checkpoint(src, tmp_path / "cut")
    last = shards[-1]
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # a download cut off half way
    _no_hang()
    try:
        with pytest.raises(InputError, match=rf"{last.name}: tensor .* past the end of the file"):
            fxsurgery.convert_checkpoint(res, folder, tmp_path / "out")
    finally:
        import signal

        signal.alarm(0)
    assert _nothing_written(tmp_path / "out")


def _header_with(path, change):
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    change(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n :])


def _offset_past_the_end(header):
    name = next(k for k in header if k != "__metadata__")
    header[name]["data_offsets"] = [10**12, 10**12 + 4]


@pytest.mark.parametrize("damage, match", [
    (lambda p: p.write_bytes((10**15).to_bytes(8, "little") + p.read_bytes()[8:]), "header length"),
    (lambda p: p.write_bytes(b"\x00\x01garbage" * 100), "not a safetensors file"),
    (lambda p: _header_with(p, _offset_past_the_end), "past the end"),
    (lambda p: _header_with(p, lambda h: h[next(k for k in h if k != "__metadata__")].update(shape="x")),
     "malformed header entry"),
    (lambda p: p.unlink(), "names shard"),
], ids=["absurd-header-size", "garbage", "offset-past-the-end", "malformed-entry", "missing-shard"])  # fmt: skip
def test_a_damaged_checkpoint_is_one_input_error_and_nothing_is_written(llama, tmp_path, damage, match):
    _, src, res = llama
    folder, shards = _copy_checkpoint(src, tmp_path / "bad")
    damage(shards[len(shards) // 2])
    _no_hang()
    try:
        with pytest.raises(InputError, match=match):
            fxsurgery.convert_checkpoint(res, folder, tmp_path / "out")
    finally:
        import signal

        signal.alarm(0)
    assert _nothing_written(tmp_path / "out")


def test_a_checkpoint_already_converted_or_a_bad_index_leaves_nothing(llama, tmp_path):
    _, src, res = llama
    fxsurgery.convert_checkpoint(res, src, tmp_path / "conv")
    with pytest.raises(InputError, match="is this checkpoint in the original format"):
        fxsurgery.convert_checkpoint(res, tmp_path / "conv", tmp_path / "again")
    assert _nothing_written(tmp_path / "again")  # the first shards are not left behind
    folder, _ = _copy_checkpoint(src, tmp_path / "index")
    (folder / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(InputError, match="not a JSON index"):
        fxsurgery.convert_checkpoint(res, folder, tmp_path / "out")
    with pytest.raises(InputError, match="parent directory .* does not exist"):
        fxsurgery.convert_checkpoint(res, src, tmp_path / "no" / "such" / "place")
    assert _nothing_written(tmp_path / "out")


def test_the_cli_reports_a_missing_shard_in_one_line(llama, tmp_path):
    import subprocess
    import sys

    _, src, res = llama
    save_layouts(res, tmp_path / "layouts.json")
    folder, shards = _copy_checkpoint(src, tmp_path / "bad")
    shards[0].unlink()
    proc = subprocess.run([sys.executable, "-m", "fxsurgery", "convert", str(folder), str(tmp_path / "out"),
                           "--layouts", str(tmp_path / "layouts.json")], capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and shards[0].name in proc.stderr
    assert _nothing_written(tmp_path / "out")
