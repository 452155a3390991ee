"""HuggingFace models from small configs with random weights (no hub access), with the inputs users call them with:
the zoo of the HuggingFace coverage table and of ``tests/test_huggingface.py``.

Each entry: a factory, example inputs (a tuple that may end with a dict of keyword inputs), and a regular expression
matching the module paths of the attention and MLP blocks (their Linear layers are what ``token_layout=True`` must
rewrite; embeddings and vector heads may stay, with reasons).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = ["ZOO", "build", "block_linears"]


def _ids(n: int = 2, s: int = 8) -> torch.Tensor:
    return torch.randint(0, 100, (n, s), generator=torch.Generator().manual_seed(1))


def _mask() -> torch.Tensor:
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[0, 5:] = 0  # a padded sequence
    return mask


def _features(seed: int = 1) -> torch.Tensor:
    """Log-mel features of a small Whisper: 16 bins, 32 frames (twice its max_source_positions)."""
    return torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(seed))


def _image(size: int = 32) -> tuple[torch.Tensor]:
    return (torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1)),)


_TEXT = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
_DECODER = dict(_TEXT, num_key_value_heads=2, max_position_embeddings=64)


def _zoo(T: Any) -> dict[str, tuple[Callable[[], nn.Module], Callable[[], tuple[Any, ...]], str]]:
    text = lambda: (_ids(), {"attention_mask": _mask()})  # noqa: E731
    return {
        "bert": (lambda: T.BertForSequenceClassification(T.BertConfig(**_TEXT, num_labels=3)), text,
                 r"encoder\.layer\.\d+\."),
        "roberta": (lambda: T.RobertaForSequenceClassification(T.RobertaConfig(**_TEXT, num_labels=3,
                                                                               pad_token_id=1)),
                    text, r"encoder\.layer\.\d+\."),
        "distilbert": (lambda: T.DistilBertForSequenceClassification(T.DistilBertConfig(
            vocab_size=100, dim=32, n_layers=2, n_heads=4, hidden_dim=64, num_labels=3)), text, r"layer\.\d+\."),
        "gpt2": (lambda: T.GPT2LMHeadModel(T.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=100,
                                                        n_positions=64, bos_token_id=0, eos_token_id=0)),
                 text, r"h\.\d+\."),
        "llama": (lambda: T.LlamaForCausalLM(T.LlamaConfig(**_DECODER)), lambda: (_ids(),), r"layers\.\d+\."),
        "mistral": (lambda: T.MistralForCausalLM(T.MistralConfig(**_DECODER)), lambda: (_ids(),), r"layers\.\d+\."),
        "qwen2": (lambda: T.Qwen2ForCausalLM(T.Qwen2Config(**_DECODER)), lambda: (_ids(),), r"layers\.\d+\."),
        "phi3": (lambda: T.Phi3ForCausalLM(T.Phi3Config(**_DECODER, pad_token_id=0, eos_token_id=0, bos_token_id=0)),
                 lambda: (_ids(),), r"layers\.\d+\."),
        "gemma": (lambda: T.GemmaForCausalLM(T.GemmaConfig(**_DECODER, head_dim=8)), lambda: (_ids(),),
                  r"layers\.\d+\."),
        "vit": (lambda: T.ViTForImageClassification(T.ViTConfig(
            image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64, num_labels=5)), _image, r"layers?\.\d+\."),
        "whisper-encoder": (lambda: T.WhisperForAudioClassification(T.WhisperConfig(
            d_model=32, encoder_layers=2, decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4,
            encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=16, max_source_positions=16, num_labels=3)),
            lambda: (_features(),), r"encoder\.layers\.\d+\."),
        "segformer": (lambda: T.SegformerForSemanticSegmentation(T.SegformerConfig(
            num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[8, 16], num_attention_heads=[1, 2],
            decoder_hidden_size=16, num_labels=3)), _image, r"stages\.\d+\.blocks\."),
        "resnet": (lambda: T.ResNetForImageClassification(T.ResNetConfig(
            num_labels=4, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic")), _image, "$^"),
        "mobilenet_v2": (lambda: T.MobileNetV2ForImageClassification(T.MobileNetV2Config(
            num_labels=5, image_size=32, depth_multiplier=0.35)), _image, "$^"),
        "convnext": (lambda: T.ConvNextForImageClassification(T.ConvNextConfig(
            hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, num_labels=3, image_size=32)), _image,
            r"stages\.\d+\.layers\."),
        # encoder-decoders as users call them: the decoder's inputs too, and an EncoderDecoderCache in the output
        "bart": (lambda: T.BartForConditionalGeneration(T.BartConfig(
            vocab_size=100, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64)),
            lambda: (_ids(), {"attention_mask": _mask(), "decoder_input_ids": _ids(s=5)}),
            r"(encoder|decoder)\.layers\.\d+\."),
        "t5": (lambda: T.T5ForConditionalGeneration(T.T5Config(
            vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)),
            lambda: (_ids(), {"attention_mask": _mask(), "decoder_input_ids": _ids(s=5)}), r"block\.\d+\.layer\."),
        # speech to text: audio features into the encoder, the decoder's ids as the keyword input
        "whisper": (lambda: T.WhisperForConditionalGeneration(T.WhisperConfig(
            vocab_size=100, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=16,
            max_source_positions=16, max_target_positions=32, pad_token_id=0, bos_token_id=1, eos_token_id=2,
            decoder_start_token_id=1)), lambda: (_features(), {"decoder_input_ids": _ids(s=4)}),
            r"(encoder|decoder)\.layers\.\d+\."),
        # its Linears are FalconLinear, a subclass computing x @ W.T + b
        "falcon": (lambda: T.FalconForCausalLM(T.FalconConfig(
            vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)), lambda: (_ids(),),
            r"h\.\d+\."),
        # its MLP runs on rows: hidden_states.reshape(-1, C) before fc1, viewed back as (B, S, C) after fc2
        "opt": (lambda: T.OPTForCausalLM(T.OPTConfig(
            vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64,
            word_embed_proj_dim=32, max_position_embeddings=64)), text, r"layers\.\d+\."),
        # one layer called at every depth: each of its Linears is one conv called three times
        "albert": (lambda: T.AlbertForSequenceClassification(T.AlbertConfig(
            **_TEXT | dict(num_hidden_layers=3), embedding_size=16, num_labels=3)), text, r"albert_layers\.\d+\."),
        # share_att_key: the key and query projections also read the relative-position table (a constant)
        "deberta-v2": (lambda: T.DebertaV2ForSequenceClassification(T.DebertaV2Config(
            **_TEXT, relative_attention=True, position_buckets=8, max_relative_positions=16,
            pos_att_type=["p2c", "c2p"], share_att_key=True, num_labels=3)), text, r"encoder\.layer\.\d+\."),
        # a state-space model: no attention; its cache a DynamicCache of linear-attention layers; dt_proj's weight is
        # read by a product of its own (listed with why), the other three projections are token Linears
        "mamba": (lambda: T.MambaForCausalLM(T.MambaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                                           state_size=4)), lambda: (_ids(),),
                  r"layers\.\d+\.mixer\.(in|x|out)_proj"),
        # fused experts (gate_up_proj (E, 2I, C), down_proj (E, C, I)) behind a top-k router
        "mixtral": (lambda: T.MixtralForCausalLM(T.MixtralConfig(**_DECODER, num_local_experts=4,
                                                                 num_experts_per_tok=2)), lambda: (_ids(),),
                    r"layers\.\d+\."),
        # ... and a shared expert (an MLP of Linears on the rows) with a sigmoid gate of its own
        "qwen2-moe": (lambda: T.Qwen2MoeForCausalLM(T.Qwen2MoeConfig(
            **_DECODER, moe_intermediate_size=16, shared_expert_intermediate_size=48, num_experts=4,
            num_experts_per_tok=2)), lambda: (_ids(),), r"layers\.\d+\."),
    }  # fmt: skip


def zoo() -> dict[str, tuple[Callable[[], nn.Module], Callable[[], tuple[Any, ...]], str]]:
    import transformers

    return _zoo(transformers)


ZOO = ("bert", "roberta", "distilbert", "gpt2", "llama", "mistral", "qwen2", "phi3", "gemma", "vit", "whisper-encoder",
       "segformer", "resnet", "mobilenet_v2", "convnext", "bart", "t5", "whisper", "falcon", "opt", "albert",
       "deberta-v2", "mamba", "mixtral", "qwen2-moe")  # fmt: skip


def build(name: str) -> tuple[nn.Module, tuple[Any, ...], str]:
    """The model (eval mode, seeded random weights), its example inputs and its block pattern."""
    make, inputs, blocks = zoo()[name]
    torch.manual_seed(0)
    return make().eval(), inputs(), blocks


def block_linears(model: nn.Module, pattern: str) -> set[str]:
    """The Linear layers (GPT-2's Conv1D, a Linear with a transposed weight, included) inside the blocks."""
    import re

    from fxsurgery.capture.layers import is_transposed_linear

    return {n for n, m in model.named_modules()
            if (isinstance(m, nn.Linear) or is_transposed_linear(m)) and re.search(pattern, n)}  # fmt: skip
