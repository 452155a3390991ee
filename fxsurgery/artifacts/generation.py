"""A rewritten language model that ``generate()``s: the original's class, its forward swapped for the rewritten
graph's (:func:`generation_model`).

The rewritten graph has no KV cache input, so each step runs on the whole sequence (``use_cache=False``, forced):
the tokens are those the original generates with its cache, step for step, as long as the graph admits every length
on the way (``dynamic_sequence=True``; checked here at a length it was not traced at). An encoder-decoder's graph
takes the prompt and the tokens decoded so far (``input_ids``, ``attention_mask``, ``decoder_input_ids``): each
step runs the rewritten encoder and decoder on them (``generate()`` still runs the original's encoder once for its
own bookkeeping; the logits are the graph's).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from fxsurgery.capture.copies import working_copy
from fxsurgery.errors import InputError, SurgeryError, one_line
from fxsurgery.report import SurgeryResult
from fxsurgery.verify.policy import compare_leaves

__all__ = ["generation_model"]


def generation_model(result: SurgeryResult, model: nn.Module, example_inputs: Any) -> nn.Module:
    """``model``'s class (a HuggingFace causal LM) with its forward running ``result.module``: ``.generate()`` works
    on it, greedy and sampled, with the original's generation settings (the cache off: the graph takes none).

    ``example_inputs`` are those of the rewrite (token ids, and a mask if the graph takes one). The graph must admit
    other sequence lengths (rewrite with ``dynamic_sequence=True``): it is run at one token more than the example and
    compared with ``model``, and an ``InputError`` says so where it is specialised to the example's length. The user's
    model is not touched: the copy's parameters are views of its weights.
    """
    if not hasattr(model, "generate") or not isinstance(result.module, nn.Module):
        raise InputError(
            f"{type(model).__name__} has no generate(): generation_model takes a HuggingFace model with generation"
        )
    ids = example_inputs[0] if isinstance(example_inputs, (tuple, list)) else example_inputs
    two_parts = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
    if not (isinstance(ids, torch.Tensor) and (two_parts or (ids.dim() == 2 and not ids.is_floating_point()))):
        raise InputError(
            "example_inputs must start with token ids (batch, sequence), or an encoder-decoder's encoder input "
            "(ids, audio features, pixels), as the rewrite was given"
        )
    inputs = tuple(inspect.signature(result.module.forward).parameters)
    if two_parts and "decoder_input_ids" not in inputs:
        raise InputError(
            f"{type(model).__name__} is an encoder-decoder and the rewritten graph takes no decoder_input_ids: "
            "rewrite it with them among the inputs, (ids, {'attention_mask': mask, 'decoder_input_ids': start})"
        )
    lm = working_copy(model).eval()
    _check_lengths(result.module, lm, _longer(ids, example_inputs, inputs))  # on the copy, still the original's class
    lm.__class__ = type(
        f"Rewritten{type(model).__name__}", (type(model),), {"forward": _forward, "generate": _generate}
    )
    lm.fxsurgery_graph, lm.fxsurgery_inputs, lm.fxsurgery_prompt = result.module, inputs, None
    if getattr(lm, "generation_config", None) is not None:
        lm.generation_config.use_cache = False
    return lm


def _longer(ids: torch.Tensor, example_inputs: Any, inputs: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The graph's inputs one token longer than the example's: its token ids (a mask of ones where it takes one), an
    encoder-decoder's decoder ids."""
    given = (
        example_inputs[-1] if isinstance(example_inputs, (tuple, list)) and isinstance(example_inputs[-1], dict) else {}
    )
    tokens = ids.dim() == 2 and not ids.is_floating_point()  # (an encoder's audio features or pixels keep their size)
    feed = {inputs[0]: torch.cat([ids, ids[:, -1:]], dim=1) if tokens else ids}
    if "attention_mask" in inputs and tokens:
        feed["attention_mask"] = torch.ones_like(feed[inputs[0]])
    start = given.get("decoder_input_ids")
    if "decoder_input_ids" in inputs and isinstance(start, torch.Tensor):
        feed["decoder_input_ids"] = torch.cat([start, start[:, -1:]], dim=1)
    return feed


def _check_lengths(graph: nn.Module, model: nn.Module, feed: dict[str, torch.Tensor]) -> None:
    """The graph run on ``feed`` (one token longer than the example) gives the logits of ``model`` (a copy of the
    user's) there."""
    length = feed.get("decoder_input_ids", next(iter(feed.values()))).shape[1]
    try:
        with torch.no_grad():
            got, want = graph(**feed).logits, model(**feed, use_cache=False).logits
    except Exception as e:
        raise InputError(
            f"the rewritten graph does not run at sequence length {length} ({one_line(e)}): it is specialised to "
            f"the example's {length - 1}; rewrite with dynamic_sequence=True (CLI --task with a HuggingFace model "
            "sets it) so that generation can run at every length. A model that fixes the length itself as it is "
            "captured (a Python loop over the tokens: Mamba's scan) gives a graph per length: generate with the "
            "original, or run the rewritten graph at the example's length"
        ) from e
    errors = compare_leaves([want], [got], label="logits")  # validation's policy: the dtype's tolerance x scale
    if errors.failure:
        raise InputError(
            f"the rewritten graph computes something else than the model at sequence length {length} "
            f"({errors.failure}): a length baked into the graph (rewrite with dynamic_sequence=True), or the graph "
            "of another model"
        )


def _generate(self: Any, *args: Any, **kwargs: Any) -> Any:
    kwargs["use_cache"] = False  # the graph takes no cache: every step runs on the whole sequence
    prompt = args[0] if args else kwargs.get(self.fxsurgery_inputs[0], kwargs.get("inputs"))
    self.fxsurgery_prompt = (prompt, kwargs.get("attention_mask"))  # an encoder-decoder's steps see only the decoder's
    try:
        return super(type(self), self).generate(*args, **kwargs)
    finally:
        self.fxsurgery_prompt = None


def _forward(self: Any, input_ids: Any = None, attention_mask: Any = None, position_ids: Any = None, **kwargs: Any):
    """The rewritten graph on the whole sequence; the cache of the output dropped (the graph keeps none)."""
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if cache is not None and getattr(cache, "get_seq_length", lambda: 0)() > 0:
        raise SurgeryError("the rewritten graph takes no KV cache: call generate() on it (it turns the cache off)")
    feed, first = {}, self.fxsurgery_inputs[0]  # the graph's first input: token ids, or an encoder's features
    input_ids = kwargs.pop(first, input_ids)
    if "decoder_input_ids" in self.fxsurgery_inputs:  # an encoder-decoder: the prompt, and the tokens decoded so far
        input_ids, attention_mask, feed = _encoder_decoder_step(self, input_ids, attention_mask, kwargs)
    length = input_ids.shape[1]
    if position_ids is not None and not torch.equal(
        position_ids, torch.arange(length, device=position_ids.device).expand_as(position_ids)
    ):
        raise SurgeryError(
            "position ids other than 0..S-1 (a left-padded batch): the rewritten graph computes its own; generate "
            "each prompt alone, or unpadded"
        )
    feed[first] = input_ids
    if "attention_mask" in self.fxsurgery_inputs:
        feed["attention_mask"] = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
    elif attention_mask is not None and not bool(attention_mask.all()):
        raise SurgeryError(
            "a padding mask, and the rewritten graph takes none: rewrite with an attention_mask among the inputs"
        )
    out = self.fxsurgery_graph(**feed)
    for key in ("cache", "past_key_values"):  # transformers 5 names it cache (past_key_values before)
        if isinstance(out, dict) and out.get(key) is not None:
            out[key] = None
    return out


def _encoder_decoder_step(self: Any, input_ids: Any, attention_mask: Any, kwargs: dict[str, Any]) -> tuple[Any, ...]:
    """An encoder-decoder's step: its prompt (given, or the one ``generate()`` was called with) and mask, and the
    graph's decoder input."""
    decoder_mask = kwargs.get("decoder_attention_mask")
    if decoder_mask is not None and not bool(decoder_mask.all()):
        raise SurgeryError("a decoder padding mask, and the rewritten graph takes none: decode each sequence alone")
    prompt, prompt_mask = self.fxsurgery_prompt or (None, None)
    input_ids = input_ids if input_ids is not None else prompt
    if input_ids is None or kwargs.get("decoder_input_ids") is None:
        raise SurgeryError(
            "the rewritten encoder-decoder runs on the encoder's input and decoder_input_ids together: call generate()"
        )
    mask = attention_mask if attention_mask is not None else prompt_mask
    return input_ids, mask, {"decoder_input_ids": kwargs["decoder_input_ids"]}
