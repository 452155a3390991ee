"""A HuggingFace model as MODEL, as ``optimum-cli export`` takes one: a local folder (``config.json`` and weights),
or a Hub id (passed to ``from_pretrained``; on a machine without network it fails, and the error says how to
download it first). ``--task`` picks the Auto class (without it: the architecture the config names), and the
example inputs are made from the config where no ``--input-shape``/``--input`` is given: token ids in the
vocabulary and an attention mask with one padded sequence, or pixel values of the config's image size."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from fxsurgery.cli.inputs import UsageError
from fxsurgery.cli.model import model_kwargs
from fxsurgery.errors import one_line

__all__ = ["TASKS", "is_folder", "is_hub_id", "load", "example_inputs"]

#: ``--task`` -> the transformers Auto class it loads (optimum's task names; ``causal-lm`` as an alias).
TASKS = {
    "text-classification": "AutoModelForSequenceClassification",
    "token-classification": "AutoModelForTokenClassification",
    "feature-extraction": "AutoModel",
    "fill-mask": "AutoModelForMaskedLM",
    "text-generation": "AutoModelForCausalLM",
    "causal-lm": "AutoModelForCausalLM",
    "question-answering": "AutoModelForQuestionAnswering",
    "image-classification": "AutoModelForImageClassification",
}
_SEQUENCE = 16  # tokens per example sequence
_BATCH = 2  # the second sequence padded: the attention mask is exercised


def is_folder(spec: str) -> bool:
    """A local HuggingFace model folder: a directory holding ``config.json``."""
    return Path(spec).is_dir() and (Path(spec) / "config.json").is_file()


def is_hub_id(spec: str) -> bool:
    """``org/name`` that is not a path here (a Hub id, as ``from_pretrained`` takes it)."""
    return re.fullmatch(r"[\w.-]+/[\w.-]+", spec) is not None and not Path(spec).exists()


def load(spec: str, task: str | None, dtype: Any, kwargs_json: str = "{}") -> Any:
    """The model in ``spec`` (folder or Hub id) for ``task``, in ``dtype`` and eval mode, ``from_pretrained`` given
    ``kwargs_json`` too (``--model-kwargs``); causal LMs without their key/value cache (the rewrite and the ONNX
    files are of the forward over a whole sequence) unless those say otherwise."""
    extra = model_kwargs(kwargs_json, "from_pretrained arguments")
    try:
        import transformers
    except ImportError as e:
        raise UsageError(f"{spec} is a HuggingFace model: pip install transformers") from e
    local = is_folder(spec)
    config = _config(transformers, spec, local)
    cls = _model_class(transformers, config, task, spec)
    kwargs: dict[str, Any] = {"local_files_only": local, "dtype": dtype}
    if cls.__name__.endswith("ForCausalLM") or task in ("causal-lm", "text-generation"):
        kwargs["use_cache"] = False
    kwargs.update(extra)
    bar = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()  # "Loading weights": fxsurgery says what it is building
    try:
        model = cls.from_pretrained(spec, **kwargs)
    except Exception as e:
        raise UsageError(f"cannot load {spec} with transformers.{cls.__name__}: {one_line(e)}") from e
    finally:
        if bar:
            transformers.utils.logging.enable_progress_bar()
    return model.eval()


def _config(transformers: Any, spec: str, local: bool) -> Any:
    try:
        return transformers.AutoConfig.from_pretrained(spec, local_files_only=local)
    except Exception as e:
        if local:
            raise UsageError(f"{spec}/config.json is not a HuggingFace config: {one_line(e)}") from e
        raise UsageError(
            f"{spec} is not a folder here, and as a HuggingFace Hub id it could not be fetched ({one_line(e)}): "
            f"without network, download it first (hf download {spec} --local-dir DIR) and give DIR"
        ) from e


def _model_class(transformers: Any, config: Any, task: str | None, spec: str) -> Any:
    """The Auto class of ``task``; without one, the class the config's ``architectures`` names."""
    if task is not None:
        return getattr(transformers, TASKS[task])
    names = [n for n in getattr(config, "architectures", None) or [] if hasattr(transformers, n)]
    if not names:
        raise UsageError(
            f"{spec}: the config names no architecture transformers has; give --task (one of {', '.join(TASKS)})"
        )
    return getattr(transformers, names[0])


def example_inputs(model: Any, seed: int = 0) -> dict[str, Any]:
    """Keyword inputs made from ``model``'s config: ``pixel_values`` for a vision model, else ``input_ids`` (in the
    vocabulary) and ``attention_mask`` (the second of two sequences padded at its end)."""
    import torch

    config = model.config
    gen = torch.Generator().manual_seed(seed)
    if getattr(model, "main_input_name", "input_ids") == "pixel_values":
        size = getattr(config, "image_size", 224)
        size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
        channels = getattr(config, "num_channels", 3)
        return {"pixel_values": torch.randn(_BATCH, channels, *size, generator=gen, dtype=model.dtype)}
    vocab = getattr(config, "vocab_size", None) or getattr(config.get_text_config(), "vocab_size", None)
    vocab = int(vocab or 2)
    ids = torch.randint(0, vocab, (_BATCH, _SEQUENCE), generator=gen)
    mask = torch.ones(_BATCH, _SEQUENCE, dtype=torch.long)
    mask[1, _SEQUENCE // 2 :] = 0
    return {"input_ids": ids, "attention_mask": mask}
