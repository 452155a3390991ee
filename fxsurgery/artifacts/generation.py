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
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from fxsurgery.capture.copies import working_copy
from fxsurgery.errors import InputError, SurgeryError, one_line
from fxsurgery.report import SurgeryResult
from fxsurgery.verify.policy import compare_leaves, full_float32

__all__ = ["generation_model"]


def generation_model(
    result: SurgeryResult | Mapping[int, SurgeryResult], model: nn.Module, example_inputs: Any
) -> nn.Module:
    """``model``'s class (a HuggingFace causal LM) with its forward running ``result.module``: ``.generate()`` works
    on it, greedy and sampled, with the original's generation settings (the cache off: the graph takes none).

    ``example_inputs`` are those of the rewrite (token ids, and a mask if the graph takes one). The graph must admit
    other sequence lengths (rewrite with ``dynamic_sequence=True``): it is run at one token more than the example and
    compared with ``model``, and an ``InputError`` says so where it is specialised to the example's length. Where the
    model fixes the length as it is captured (Mamba's scan), ``result`` is a mapping ``{length: result}`` of graphs
    each rewritten at its length (a decoder's): each is checked at its own, a step runs the graph of its length, and
    a step at a length without one raises a ``SurgeryError`` naming the lengths there are. The user's model is not
    touched: the copy's parameters are views of its weights.
    """
    graph: Any = (
        {n: getattr(r, "module", None) for n, r in result.items()}
        if isinstance(result, Mapping)
        else getattr(result, "module", None)
    )
    modules = list(graph.values()) if isinstance(graph, dict) else [graph]
    if not hasattr(model, "generate") or not modules or not all(isinstance(g, nn.Module) for g in modules):
        raise InputError(
            f"{type(model).__name__} has no generate(): generation_model takes a HuggingFace model with generation"
            if not hasattr(model, "generate")
            else "result must be a SurgeryResult, or a mapping {sequence length: SurgeryResult}, of a module"
        )
    ids = example_inputs[0] if isinstance(example_inputs, (tuple, list)) else example_inputs
    two_parts = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
    if not (isinstance(ids, torch.Tensor) and (two_parts or (ids.dim() == 2 and not ids.is_floating_point()))):
        raise InputError(
            "example_inputs must start with token ids (batch, sequence), or an encoder-decoder's encoder input "
            "(ids, audio features, pixels), as the rewrite was given"
        )
    inputs = _inputs_of(modules, two_parts, type(model).__name__, per_length=isinstance(graph, dict))
    lm = working_copy(model).eval()  # checked on the copy, still the original's class
    if isinstance(graph, dict):
        for n, one in graph.items():
            _check_lengths(one, lm, _at_length(ids, inputs, n), length_given=n)
    else:
        _check_lengths(graph, lm, _longer(ids, example_inputs, inputs))
    lm.__class__ = type(
        f"Rewritten{type(model).__name__}", (type(model),), {"forward": _forward, "generate": _generate}
    )
    lm.fxsurgery_graph = graph  # the graph, or the graphs per length
    lm.fxsurgery_inputs, lm.fxsurgery_prompt = inputs, None
    if getattr(lm, "generation_config", None) is not None:
        lm.generation_config.use_cache = False
    return lm


def _inputs_of(graphs: list[nn.Module], two_parts: bool, name: str, per_length: bool) -> tuple[str, ...]:
    """The graphs' input names (the same for every length)."""
    names = {tuple(inspect.signature(g.forward).parameters) for g in graphs}
    if len(names) > 1:
        raise InputError(f"the graphs per length take other inputs ({' / '.join(map(', '.join, sorted(names)))})")
    inputs = names.pop()
    if two_parts and "decoder_input_ids" not in inputs:
        raise InputError(
            f"{name} is an encoder-decoder and the rewritten graph takes no decoder_input_ids: "
            "rewrite it with them among the inputs, (ids, {'attention_mask': mask, 'decoder_input_ids': start})"
        )
    if two_parts and per_length:
        raise InputError("graphs per sequence length serve decoder-only models: rewrite an encoder-decoder once")
    return inputs


def _at_length(ids: torch.Tensor, inputs: tuple[str, ...], length: int) -> dict[str, torch.Tensor]:
    """Token ids of ``length`` (the example's, cut, or longer by its last token repeated), a mask of ones where the
    graph takes one."""
    if not isinstance(length, int) or isinstance(length, bool) or length < 1:
        raise InputError(f"a graph per length is keyed by its sequence length, a positive int (got {length!r})")
    feed = {inputs[0]: torch.cat([ids, ids[:, -1:].expand(-1, max(0, length - ids.shape[1]))], dim=1)[:, :length]}
    if "attention_mask" in inputs:
        feed["attention_mask"] = torch.ones_like(feed[inputs[0]])
    return feed


def _longer(ids: torch.Tensor, example_inputs: Any, inputs: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The graph's inputs one token longer than the example's: its token ids (a mask of ones where it takes one), an
    encoder-decoder's decoder ids."""
    given = (
        example_inputs[-1] if isinstance(example_inputs, (tuple, list)) and isinstance(example_inputs[-1], dict) else {}
    )
    tokens = ids.dim() == 2 and not ids.is_floating_point()  # (an encoder's audio features or pixels keep their size)
    feed = _at_length(ids, inputs, ids.shape[1] + 1) if tokens else {inputs[0]: ids}
    start = given.get("decoder_input_ids")
    if "decoder_input_ids" in inputs and isinstance(start, torch.Tensor):
        feed["decoder_input_ids"] = torch.cat([start, start[:, -1:]], dim=1)
    return feed


def _check_lengths(
    graph: nn.Module, model: nn.Module, feed: dict[str, torch.Tensor], length_given: int | None = None
) -> None:
    """The graph run on ``feed`` (one token longer than the example, or the length it is given for) gives the logits
    of ``model`` (a copy of the user's) there."""
    length = feed.get("decoder_input_ids", next(iter(feed.values()))).shape[1]
    try:
        with torch.no_grad(), full_float32():
            got, want = graph(**feed).logits, model(**feed, use_cache=False).logits
    except Exception as e:
        if length_given is not None:
            raise InputError(
                f"the graph given for sequence length {length} does not run at that length ({one_line(e)}): "
                "rewrite the model with token ids of that length"
            ) from e
        raise InputError(
            f"the rewritten graph does not run at sequence length {length} ({one_line(e)}): it is specialised to "
            f"the example's {length - 1}; rewrite with dynamic_sequence=True (CLI --task with a HuggingFace model "
            "sets it) so that generation can run at every length. A model that fixes the length itself as it is "
            "captured (a Python loop over the tokens: Mamba's scan) gives a graph per length: rewrite it at each "
            "length generation runs through (the prompt's up to prompt + new tokens - 1) and pass "
            "{length: result, ...} to generation_model"
        ) from e
    errors = compare_leaves([want], [got], label="logits")  # validation's policy: the dtype's tolerance x scale
    if errors.failure:
        raise InputError(
            f"the rewritten graph computes something else than the model at sequence length {length} "
            f"({errors.failure}): "
            + (
                "a graph rewritten at another length, or of another model"
                if length_given is not None
                else "a length baked into the graph (rewrite with dynamic_sequence=True), or the graph of another model"
            )
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
    out = _graph_at(self.fxsurgery_graph, length)(**feed)
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


def _graph_at(graphs: nn.Module | dict[int, nn.Module], length: int) -> nn.Module:
    """The graph a step of ``length`` tokens runs: the one graph, or the one given for that length."""
    if isinstance(graphs, nn.Module):
        return graphs
    if length not in graphs:
        raise SurgeryError(
            f"this step runs on {length} tokens and the rewritten graphs are for lengths {sorted(graphs)} only (a "
            "graph per length): rewrite the model at that length too, or generate fewer tokens (max_new_tokens)"
        )
    return graphs[length]
