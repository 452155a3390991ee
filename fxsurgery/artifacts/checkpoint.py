"""Checkpoints across a rewrite: load an original-format state dict into a rewritten model, and back.

A rewritten parameter keeps its name (``fc.weight``) and is a view of the original one, so its layout is fully
described by the two views' (shape, stride, offset) over the same storage. :func:`record_layout` stores that in
``gm.meta["fxsurgery_layouts"]``; :func:`load_state_dict` and :func:`original_state_dict` replay it, bit-identically.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Collection, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from fxsurgery.artifacts import ARTIFACTS
from fxsurgery.capture.copies import working_copy
from fxsurgery.engine.weights import shares_storage
from fxsurgery.errors import InputError, one_line

__all__ = [
    "ParamLayout",
    "record_layout",
    "record_module_layouts",
    "merge_layouts",
    "layouts_of",
    "load_state_dict",
    "original_state_dict",
    "save_rewritten",
    "save_layouts",
    "load_layouts",
    "ARTIFACTS",
]

META_KEY = "fxsurgery_layouts"


@dataclass(frozen=True)
class ParamLayout:
    """Where the original and the rewritten view of one parameter sit in a common storage of ``numel`` elements."""

    original: tuple[tuple[int, ...], tuple[int, ...], int]
    rewritten: tuple[tuple[int, ...], tuple[int, ...], int]
    numel: int

    def to_rewritten(self, t: torch.Tensor) -> torch.Tensor:
        buf = torch.empty(self.numel, dtype=t.dtype, device=t.device)
        buf.as_strided(*self.original).copy_(t)
        return buf.as_strided(*self.rewritten)

    def to_original(self, t: torch.Tensor) -> torch.Tensor:
        buf = torch.empty(self.numel, dtype=t.dtype, device=t.device)
        buf.as_strided(*self.rewritten).copy_(t)
        return buf.as_strided(*self.original).contiguous()


def _view(t: torch.Tensor) -> tuple[tuple[int, ...], tuple[int, ...], int]:
    return tuple(t.shape), tuple(t.stride()), int(t.storage_offset())


def record_layout(gm: fx.GraphModule, name: str, original: torch.Tensor, rewritten: torch.Tensor) -> None:
    """Remember how parameter ``name`` of ``gm`` views the original parameter's storage.

    A weight that could not be a view (a channels-last or otherwise non-contiguous kernel reshaped into a Linear
    weight) is a copy of the original's values in their logical order: it is recorded against the original laid
    out contiguously, which is what the copy holds.
    """
    if original.shape == rewritten.shape and original.stride() == rewritten.stride():
        return
    source = _view(original)
    if _copied(original, rewritten):
        source = (tuple(original.shape), _contiguous_strides(original.shape), 0)
    numel = max(source[2] + _extent(original, source[1]), _view(rewritten)[2] + _extent(rewritten))
    gm.meta.setdefault(META_KEY, {})[name] = ParamLayout(source, _view(rewritten), numel)


def _copied(original: torch.Tensor, rewritten: torch.Tensor) -> bool:
    if original.device.type == "meta" or rewritten.device.type == "meta":
        return not original.is_contiguous()  # what a reshape of it would do
    return not shares_storage(original, rewritten)


def _contiguous_strides(shape: torch.Size) -> tuple[int, ...]:
    strides, step = [], 1
    for d in reversed(shape):
        strides.append(step)
        step *= max(int(d), 1)
    return tuple(reversed(strides))


def record_module_layouts(gm: fx.GraphModule, old: dict[str, nn.Module], new: dict[str, nn.Module]) -> None:
    """Record the layout of every parameter of the modules ``new`` that replace ``old`` (by qualified name)."""
    for name, mod in new.items():
        for pname, p in mod.named_parameters():
            record_layout(gm, f"{name}.{pname}", old[name].get_parameter(pname), p)


def merge_layouts(target: nn.Module, prefix: str, child: nn.Module) -> None:
    """``child`` was installed in ``target`` at ``prefix``: its recorded layouts become ``target``'s, prefixed."""
    for key, layout in layouts_of(child).items():
        if not isinstance(getattr(target, "meta", None), dict):
            target.meta = {}  # type: ignore[assignment]
        target.meta.setdefault(META_KEY, {})[prefix + key] = layout  # type: ignore[union-attr,operator]


def _extent(t: torch.Tensor, stride: tuple[int, ...] | None = None) -> int:
    return 1 + sum((s - 1) * st for s, st in zip(t.shape, stride or t.stride())) if t.numel() else 0


def layouts_of(module: nn.Module) -> dict[str, ParamLayout]:
    """The recorded layout of every rewritten parameter of ``module``, by name."""
    meta = getattr(module, "meta", None)
    return dict(meta.get(META_KEY, {})) if isinstance(meta, dict) else {}


def save_layouts(model: Any, path: str | os.PathLike) -> None:
    """Write the parameter layouts of a rewritten model (or a SurgeryResult) as JSON: what
    :func:`fxsurgery.convert_checkpoint` and ``fxsurgery convert --layouts`` read."""
    layouts = {k: asdict(v) for k, v in layouts_of(getattr(model, "module", model)).items()}
    Path(path).write_text(json.dumps({"format": "fxsurgery-layouts", "version": 1, "layouts": layouts}, indent=1))


def load_layouts(path: str | os.PathLike) -> dict[str, ParamLayout]:
    try:
        data = json.loads(Path(path).read_text())
        return {
            k: ParamLayout(_tuples(v["original"]), _tuples(v["rewritten"]), int(v["numel"]))
            for k, v in data["layouts"].items()
        }
    except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError) as e:
        raise InputError(f"{path} is not a layouts file written by fxsurgery ({type(e).__name__}: {e})") from e


def _tuples(view: list[Any]) -> tuple[tuple[int, ...], tuple[int, ...], int]:
    return tuple(view[0]), tuple(view[1]), int(view[2])


def original_state_dict(rewritten: nn.Module) -> dict[str, torch.Tensor]:
    """The rewritten model's state in the original model's format (names and shapes), as new tensors."""
    layouts = layouts_of(rewritten)
    out = {}
    for k, v in rewritten.state_dict().items():
        out[k] = layouts[k].to_original(v.detach()) if k in layouts else v.detach().clone()
    return out


def load_state_dict(rewritten: nn.Module, state_dict: dict[str, torch.Tensor], strict: bool = True) -> Any:
    """Load an original-format state dict into ``rewritten``. Tensors already in the rewritten format load as is.

    Like ``nn.Module.load_state_dict`` the values are copied into the existing parameters, which are views of the
    original model's storage: loading into the rewritten model updates the original model too.
    """
    layouts = layouts_of(rewritten)
    converted = {}
    own = rewritten.state_dict()
    for k, v in state_dict.items():
        if k in layouts and k in own and tuple(v.shape) == layouts[k].original[0] and v.shape != own[k].shape:
            converted[k] = layouts[k].to_rewritten(v)
        else:
            converted[k] = v
    return rewritten.load_state_dict(converted, strict=strict)


def _builtin(value: Any) -> Any:
    """``value`` with every mapping that is not a ``dict`` made one (a ``ModelOutput``: its fields, in order)."""
    if isinstance(value, Mapping):
        return {k: _builtin(v) for k, v in value.items()}
    if type(value) in (list, tuple):
        return type(value)(_builtin(v) for v in value)
    return value


def _foreign(value: Any) -> bool:
    """Whether ``value`` holds a mapping that is not a ``dict`` (which :func:`_builtin` makes one)."""
    if isinstance(value, Mapping):
        return type(value) is not dict or any(_foreign(v) for v in value.values())
    return type(value) in (list, tuple) and any(_foreign(v) for v in value)


def _plain_outputs(module: nn.Module, outputs: Any) -> nn.Module:
    """``module`` returning ``outputs`` with plain dicts (:func:`_builtin`), parameters shared, names kept: a saved
    program then loads without the output classes registered. A graph torch.export raised builds its outputs from
    the out_spec of its code generator (which torch.export reads back): a copy of it gets the plain one; any other
    module, a shallow copy whose forward converts."""
    import torch.utils._pytree as pytree

    codegen = getattr(getattr(module, "graph", None), "_codegen", None)
    if isinstance(codegen, fx.graph._PyTreeCodeGen):
        plain = working_copy(module)
        spec = pytree.tree_flatten(_builtin(outputs))[1]
        plain.graph._codegen = fx.graph._PyTreeCodeGen(codegen.pytree_info._replace(out_spec=spec))
        plain.recompile()
        return plain
    cls = type(module)
    view = copy.copy(module)
    view.__class__ = type(
        cls.__name__,
        (cls,),
        {
            "forward": lambda self, *args, **kwargs: _builtin(cls.forward(self, *args, **kwargs)),
            "__module__": cls.__module__,
            "__qualname__": cls.__qualname__,
        },
    )
    return view


def save_rewritten(
    gm: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    out_dir: str | os.PathLike,
    artifacts: Collection[str] = ARTIFACTS,
    program: Any = None,
) -> dict[str, str]:
    """Save ``gm`` in forms a user can load back, those of ``artifacts``; returns {file: what it is}.

    * ``safetensors``: ``rewritten.safetensors``, its state dict (rewritten shapes), ``original_format.safetensors``,
      the same weights in the original model's format, and ``layouts.json`` (for ``fxsurgery convert``);
    * ``code``: ``rewritten_code.py``, the generated forward;
    * ``pt2``: ``rewritten.pt2``, a ``torch.export`` program with a dynamic batch where the model allows one (load
      with ``torch.export.load``), when the model exports; ``program`` where the rewrite already made one (an
      ExportedProgram rewritten: the same call and dynamic dims as the program given).
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    saved: dict[str, str] = {}
    if "safetensors" in artifacts:
        state = {k: v.detach().contiguous().clone() for k, v in gm.state_dict().items()}
        save_file(state, str(out / "rewritten.safetensors"))
        saved["rewritten.safetensors"] = "state dict of the rewritten model (safetensors)"
        save_file(original_state_dict(gm), str(out / "original_format.safetensors"))
        saved["original_format.safetensors"] = "the same weights in the original model's layout"
        if layouts_of(gm):
            save_layouts(gm, out / "layouts.json")
            saved["layouts.json"] = "how each rewritten parameter views the original: fxsurgery convert --layouts"
    if "code" in artifacts:
        graphs = [(name, m) for name, m in gm.named_modules() if isinstance(m, fx.GraphModule)]
        code = "\n".join(f"# {name or 'root'}: {type(m).__name__}\n{m.code}" for name, m in graphs)
        (out / "rewritten_code.py").write_text(code)
        saved["rewritten_code.py"] = "generated forward of the rewritten GraphModule(s)"
    if "pt2" not in artifacts:
        return saved
    try:
        from fxsurgery.capture.export import export_model  # (a dynamic batch, as the ONNX files have)

        foreign = False
        if program is None:
            module = working_copy(gm).eval()
            buffers = [(b, b.clone()) for b in module.buffers() if b.device.type != "meta"]
            with torch.no_grad():  # one run, to see the outputs' types; the state it leaves is put back
                outputs = module(*[t.clone() for t in inputs])
                for b, before in buffers:
                    if not torch.equal(b, before):  # (a buffer expanded from one row cannot be written, nor changes)
                        b.copy_(before)
            foreign = _foreign(outputs)
            program = export_model(_plain_outputs(module, outputs) if foreign else module, inputs)
        torch.export.save(program, str(out / "rewritten.pt2"))
        saved["rewritten.pt2"] = "torch.export program: torch.export.load(path).module()"
        if foreign:
            saved["rewritten.pt2"] += (
                " (its outputs as plain dicts: the model's own output classes, such as transformers' ModelOutput, "
                "are not registered for loading a .pt2 in another process)"
            )
    except Exception as e:  # an exportable fx graph is not guaranteed; the other files still hold everything
        saved["rewritten.pt2"] = f"not written: torch.export failed ({one_line(e, 200)})"
    return saved
