"""How the command line gets the user's model: a factory (``package.module:callable`` or ``file.py:callable``) called
with ``--model-kwargs``, and optional ``--weights``; or a ``.pt2`` file (an ExportedProgram, ``torch.export.save``)."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import pkgutil
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fxsurgery.cli.inputs import UsageError

__all__ = ["load_factory", "model_kwargs", "build_model", "load_weights", "load_program"]


def load_factory(spec: str) -> Callable[[], Any]:
    """Resolve ``package.module:callable``, ``package.module.callable`` or ``path/to/file.py:callable``."""
    where, _, name = spec.rpartition(":")
    if ":" not in spec:
        obj = _dotted(spec)
    elif where.endswith(".py") or os.sep in where:
        path = Path(where)
        if not path.is_file():
            raise UsageError(f"model file not found: {where}")
        module_spec = importlib.util.spec_from_file_location(f"_fxsurgery_user_{path.stem}", path)
        module = importlib.util.module_from_spec(module_spec)  # type: ignore[arg-type]
        sys.path.insert(0, str(path.parent.resolve()))
        try:
            module_spec.loader.exec_module(module)  # type: ignore[union-attr]
        except (Exception, SystemExit) as e:
            raise UsageError(f"cannot import {where}: {type(e).__name__}: {e}") from e
        finally:
            sys.path.pop(0)
        obj = module
        for part in name.split("."):
            if not hasattr(obj, part):
                raise UsageError(f"{where} has no attribute {name!r}")
            obj = getattr(obj, part)
    else:
        obj = _resolve(spec, where, name)
    if not callable(obj):
        raise UsageError(f"{spec} is not callable: expected a function or class returning an nn.Module")
    return obj


def _dotted(spec: str) -> Any:
    """``package.module.callable`` (``torchvision.models.resnet18``): the longest importable prefix, then attributes."""
    head, _, name = spec.rpartition(".")
    if not head or not name.isidentifier() or os.sep in spec or spec.endswith(".py"):
        raise UsageError(
            f"MODEL must be package.module:callable, package.module.callable or file.py:callable, got {spec!r}"
        )
    try:
        obj = pkgutil.resolve_name(spec)
    except (Exception, SystemExit) as e:
        raise UsageError(
            f"cannot resolve {spec!r}: {type(e).__name__}: {e} (MODEL is package.module:callable, e.g. "
            f"{head}:{name}, or file.py:callable)"
        ) from e
    return obj


def _resolve(spec: str, where: str, name: str) -> Any:
    """``package.module:callable`` as the standard library reads it (``pkgutil.resolve_name``, as entry points)."""
    try:
        importlib.import_module(where)
    except (Exception, SystemExit) as e:
        raise UsageError(f"cannot import module {where!r}: {type(e).__name__}: {e}") from e
    try:
        return pkgutil.resolve_name(spec)
    except AttributeError as e:
        raise UsageError(f"{where} has no attribute {name!r}") from e
    except (Exception, SystemExit) as e:
        raise UsageError(f"cannot resolve {spec!r}: {type(e).__name__}: {e}") from e


def model_kwargs(text: str, of: str = "keyword arguments") -> dict[str, Any]:
    """``--model-kwargs``: a JSON object (of the factory's keyword arguments, or ``of`` what else takes them)."""
    try:
        kwargs = json.loads(text)
    except ValueError as e:
        raise UsageError(f"--model-kwargs is not JSON: {e}") from e
    if not isinstance(kwargs, dict):
        raise UsageError(f"--model-kwargs must be a JSON object of {of}, got {text!r}")
    return kwargs


def build_model(spec: str, kwargs_json: str = "{}") -> Any:
    from torch import nn

    kwargs = model_kwargs(kwargs_json)
    factory = load_factory(spec)
    try:
        model = factory(**kwargs)
    except SystemExit as e:  # user code that exits is not a result: say so, never "passed"
        raise UsageError(f"calling {spec}() exited (SystemExit: {e.code}) instead of returning a model") from e
    except Exception as e:
        raise UsageError(f"calling {spec}() failed: {type(e).__name__}: {e}") from e
    if not isinstance(model, nn.Module):
        raise UsageError(f"{spec}() returned {type(model).__name__}, not a torch.nn.Module")
    return model


def load_weights(model: Any, path: str, allow_pickle: bool) -> None:
    import torch

    file = Path(path)
    if not file.is_file():
        raise UsageError(f"weights file not found: {path}")
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(file))
        else:
            state = torch.load(str(file), map_location="cpu", weights_only=not allow_pickle)
    except Exception as e:
        hint = "" if allow_pickle else " (only tensors are loaded by default; see --unsafe-pickle)"
        raise UsageError(f"cannot read weights file {path}: {type(e).__name__}: {str(e).splitlines()[0]}{hint}") from e
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # type: ignore[assignment]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UsageError(f"weights file {path} does not hold a state dict of tensors")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        expected = model.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        shapes = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
        parts = [
            f"{label} {keys[:3]}{'...' if len(keys) > 3 else ''}"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes))
            if keys
        ]
        raise UsageError(f"weights file {path} does not match the model: {'; '.join(parts) or e}") from e


def load_program(
    path: str, given: bool, args_used: dict[str, bool], allow_pickle: bool = False
) -> tuple[Any, tuple, dict[str, Any]]:
    """The ExportedProgram in ``path`` and its example inputs (positional, keyword) when no input was ``given``
    (else empty: the caller's are used). The options that only apply to a model factory are refused.

    ``torch.export.load`` unpickles what it cannot read as tensors (sample inputs, weights and constants stored as
    pickles, custom objects), and unpickling runs whatever code the file names. Unless ``allow_pickle``
    (``--unsafe-pickle``), a file that holds pickled objects is refused before anything is loaded, and every
    ``torch.load`` inside is held to ``weights_only=True`` (tensors and containers only)."""
    import torch

    for flag, used in args_used.items():
        if used:
            raise UsageError(f"{flag} applies to a model factory, not to a .pt2 file (its weights and dtype are in it)")
    if not Path(path).is_file():
        raise UsageError(f"model file not found: {path}")
    _register_quantized_ops(path)
    try:
        if allow_pickle:
            program = torch.export.load(path)
        else:
            _refuse_pickled_objects(path)
            with _weights_only():
                program = torch.export.load(path)
    except UsageError:
        raise
    except Exception as e:
        hint = (
            ""
            if allow_pickle
            else (
                " (only tensors are unpickled by default: a file that needs more runs code "
                "from the file when loaded; pass --unsafe-pickle only if you trust it)"
            )
        )
        raise UsageError(
            f"cannot read {path} as a torch.export program: {type(e).__name__}: "
            f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}{hint}"
        ) from e
    if given:
        return program, (), {}
    if program.example_inputs is None:
        raise UsageError(f"{path} holds no example inputs: give --input-shape (and/or --input NAME=SHAPE[:DTYPE])")
    args, kwargs = program.example_inputs
    return program, tuple(args), dict(kwargs)


def _register_quantized_ops(path: str) -> None:
    """Register the quantize/dequantize ops a quantized program names, which must exist before it loads: PT2E's
    (``quantized_decomposed``, defined by torch) and, where the file names them, torchao's (``.[quant]``)."""
    import importlib
    import zipfile

    importlib.import_module("torch.ao.quantization.fx._decomposed")
    try:
        with zipfile.ZipFile(path) as archive:
            named = any(b"torch.ops.torchao." in archive.read(n) for n in archive.namelist() if n.endswith(".json"))
    except (OSError, zipfile.BadZipFile):
        return  # not an archive: torch.export.load says so
    if named:
        try:
            importlib.import_module("torchao.quantization.quant_primitives")
        except ImportError as e:
            raise UsageError(f"{path} holds torchao's quantized ops: pip install 'fxsurgery[quant]' (torchao)") from e


def _refuse_pickled_objects(path: str) -> None:
    """Refuse a ``.pt2`` whose constants are pickled Python or TorchScript objects: loading them unpickles."""
    import zipfile

    from torch.export.pt2_archive.constants import CUSTOM_OBJ_FILENAME_PREFIX, OPAQUE_OBJ_FILENAME_PREFIX

    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError) as e:
        raise UsageError(f"cannot read {path} as a torch.export program: {type(e).__name__}: {e}") from e
    objects = [
        n
        for n in names
        if "/constants/" in n
        and n.rsplit("/", 1)[-1].startswith((CUSTOM_OBJ_FILENAME_PREFIX, OPAQUE_OBJ_FILENAME_PREFIX))
    ]
    if objects:
        raise UsageError(
            f"{path} holds pickled objects ({objects[0]}{', ...' if len(objects) > 1 else ''}); loading "
            "them runs code from the file: pass --unsafe-pickle only if you trust it"
        )


@contextmanager
def _weights_only() -> Iterator[None]:
    """Every ``torch.load`` in the block loads tensors and containers only, whatever ``weights_only`` its caller
    passes (``torch.export.load`` passes False for its sample inputs and pickled weights): torch's own switch,
    ``TORCH_FORCE_WEIGHTS_ONLY_LOAD``, set for the block and put back after it."""
    keys = ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
