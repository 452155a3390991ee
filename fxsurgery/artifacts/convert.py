"""Streamed checkpoint conversion: a safetensors checkpoint (one file, or HuggingFace's sharded folder with
``model.safetensors.index.json``) rewritten into the other model's format tensor by tensor, never holding more than
one tensor and its converted copy.

A rewritten parameter keeps its name and is a view of the original's storage (:mod:`fxsurgery.artifacts.checkpoint`
records each view as a :class:`~fxsurgery.artifacts.checkpoint.ParamLayout`), so converting a checkpoint is, per tensor,
replaying that view. Where the two views lay out the same bytes (``W.view(O, C, 1, 1)`` of a contiguous ``W``), the
bytes are copied as they are, in chunks; only a tensor whose bytes move (GPT-2's transposed ``Conv1D`` weight) is loaded
and converted.

The safetensors files are read and written here rather than with ``safetensors.torch.load_file``/``save_file``,
which hold a whole shard: the format is an 8-byte little-endian header length, a JSON header (dtype, shape and byte
range of every tensor; 8-byte aligned), then the bytes. The output is read back by the ``safetensors`` library in
the tests.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO

import torch
import torch.fx as fx
from torch import nn
from torch.fx.node import map_aggregate

from fxsurgery.artifacts._staging import staged_folder
from fxsurgery.artifacts.checkpoint import ParamLayout, layouts_of, load_layouts
from fxsurgery.errors import InputError

__all__ = ["convert_checkpoint", "materialize"]

INDEX = "model.safetensors.index.json"
_CHUNK = 64 << 20
_MAX_HEADER = 100 << 20  # the safetensors library refuses headers over 100 MB too
_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


def _module(model: Any) -> nn.Module:
    module = getattr(model, "module", model)  # a SurgeryResult, or the rewritten module itself
    if not isinstance(module, nn.Module):
        raise InputError(f"expected a SurgeryResult or a rewritten nn.Module, got {type(model).__name__}")
    return module


def convert_checkpoint(
    result: Any, src: str | os.PathLike, dst: str | os.PathLike, *, to: str = "rewritten"
) -> dict[str, Any]:
    """Convert the safetensors checkpoint ``src`` into ``dst`` for the rewritten model (``to="rewritten"``) or back
    into the original model's format (``to="original"``), streaming tensor by tensor.

    ``result`` is a :class:`~fxsurgery.SurgeryResult`, a rewritten module, or the path of a layouts JSON file
    (:func:`save_layouts`; ``fxsurgery rewrite`` writes ``layouts.json``). ``src`` is a ``.safetensors`` file or a
    folder holding ``model.safetensors`` or a sharded checkpoint (``model.safetensors.index.json``); ``dst`` (a
    folder that must not exist or be empty) gets the same files: the same shards with the same tensor names, the
    index, and every other file of ``src`` (``config.json``, ...) copied as it is. Returns a summary.
    """
    if to not in ("rewritten", "original"):
        raise InputError(f"to must be 'rewritten' or 'original', got {to!r}")
    layouts = load_layouts(result) if isinstance(result, (str, os.PathLike)) else layouts_of(_module(result))
    files, index = _sources(Path(src))
    summary: dict[str, Any] = {"files": [], "tensors": 0, "converted": 0, "moved_bytes": 0, "total_bytes": 0}
    seen: set[str] = set()
    with staged_folder(dst, "the destination", "give a new folder for the converted checkpoint") as out:
        for file in files:
            done = _convert_file(file, out / file.name, layouts, to == "rewritten")
            summary["files"].append(file.name)
            for key in ("tensors", "converted", "moved_bytes", "total_bytes"):
                summary[key] += done[key]
            seen |= done["names"]
        missing = sorted(set(layouts) - seen)
        if missing:
            shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
            raise InputError(f"the checkpoint lacks {len(missing)} rewritten parameter(s) of the model: {shown}")
        if index is not None:
            data = _index(index)
            data.setdefault("metadata", {})["total_size"] = summary["total_bytes"]
            (out / INDEX).write_text(json.dumps(data, indent=2))
        if Path(src).is_dir():
            for other in sorted(Path(src).iterdir()):
                if other.is_file() and other.suffix != ".safetensors" and other.name != INDEX:
                    shutil.copy2(other, out / other.name)
    return summary


def materialize(
    module: nn.Module, buffers: nn.Module | Mapping[str, torch.Tensor], device: str | torch.device = "cpu"
) -> list[str]:
    """Make a model rewritten on the meta device runnable on ``device`` once its weights are loaded
    (``load_state_dict(..., assign=True)``): the buffers still on meta get real values and the device the graph
    was traced on (``arange(..., device='meta')``) becomes ``device``.

    Non-persistent buffers (rotary embeddings' ``inv_freq``) are computed from the config, not stored in checkpoints:
    each is taken by name from ``buffers`` (a module built on ``device`` from the same config, or a dict); an empty one
    (an empty cache constant that export lifted) is made empty. Returns the names filled; raises
    :class:`~fxsurgery.InputError` naming a buffer it cannot fill."""
    given = dict(buffers.named_buffers()) if isinstance(buffers, nn.Module) else dict(buffers)
    target = torch.device(device)
    filled = []
    for name, buf in list(module.named_buffers()):
        if not buf.is_meta:
            continue
        if name in given:
            value = given[name].detach().clone().to(target)
        elif buf.numel() == 0:
            value = torch.empty(buf.shape, dtype=buf.dtype, device=target)
        else:
            raise InputError(
                f"buffer {name} {tuple(buf.shape)} is still on the meta device and not in the given "
                "buffers: pass a module or dict that has it"
            )
        owner, _, leaf = name.rpartition(".")
        holder = module.get_submodule(owner)
        holder.register_buffer(leaf, value, persistent=leaf not in holder._non_persistent_buffers_set)
        filled.append(name)
    meta = torch.device("meta")
    for gm in module.modules():
        if isinstance(gm, fx.GraphModule):
            for node in gm.graph.nodes:
                node.args, node.kwargs = (
                    map_aggregate(a, lambda v: target if v == meta else v) for a in (node.args, node.kwargs)
                )
            gm.recompile()
    return filled


def _sources(src: Path) -> tuple[list[Path], Path | None]:
    if src.is_file():
        if src.suffix != ".safetensors":
            raise InputError(f"{src} is not a .safetensors file; convert .bin/.pt checkpoints to safetensors first")
        return [src], None
    if not src.is_dir():
        raise InputError(f"checkpoint not found: {src}")
    if (src / INDEX).is_file():
        weight_map = _index(src / INDEX).get("weight_map", {})
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise InputError(f"{src / INDEX}: 'weight_map' is not an object of tensor name -> shard file name")
        shards = [src / name for name in dict.fromkeys(weight_map.values())]
        absent = [p.name for p in shards if not p.is_file()]
        if absent:
            raise InputError(
                f"{src / INDEX} names shard(s) that are not in {src}: {', '.join(absent[:3])}"
                f"{' ...' if len(absent) > 3 else ''}"
            )
        return shards, src / INDEX
    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise InputError(f"{src} holds no .safetensors file (nor {INDEX})")
    return files, None


def _index(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise InputError(f"{path} is not a JSON index ({e})") from e
    if not isinstance(data, dict):
        raise InputError(f"{path} is not a JSON object")
    return data


def _read_header(f: BinaryIO, path: Path) -> tuple[dict[str, Any], int]:
    """The header of a safetensors file, every entry checked against the file's size (a cut-off download, a header
    that points past the end): an :class:`~fxsurgery.InputError` naming the tensor and the shard, never a hang."""
    file_size = os.fstat(f.fileno()).st_size
    raw = f.read(8)
    size = int.from_bytes(raw, "little")
    if len(raw) < 8 or size > file_size - 8 or size > _MAX_HEADER:
        raise InputError(
            f"{path} is not a safetensors file: its header length ({size if len(raw) == 8 else '?'} "
            f"bytes) does not fit in the file ({file_size} bytes); is it cut off?"
        )
    try:
        header = json.loads(f.read(size))
    except (ValueError, UnicodeDecodeError) as e:
        raise InputError(f"{path} is not a safetensors file (unreadable header: {e})") from e
    if not isinstance(header, dict):
        raise InputError(f"{path} is not a safetensors file (its header is not a JSON object)")
    data = file_size - 8 - size
    for name, entry in header.items():
        if name != "__metadata__":
            _check_entry(path, name, entry, data)
    return header, 8 + size


def _check_entry(path: Path, name: str, entry: Any, data: int) -> None:
    """One header entry: a known dtype, a shape, and a byte range inside the file's ``data`` bytes that holds
    exactly that shape."""
    where = f"{path.name}: tensor {name}"
    ok = isinstance(entry, dict) and isinstance(entry.get("dtype"), str) and isinstance(entry.get("shape"), list)
    offsets = entry.get("data_offsets") if ok else None
    if not (
        ok
        and isinstance(offsets, list)
        and len(offsets) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in [*offsets, *entry["shape"]])
    ):
        raise InputError(f"{where} has a malformed header entry ({str(entry)[:120]})")
    begin, end = offsets
    if not begin <= end <= data:
        raise InputError(
            f"{where}: bytes {begin}..{end} lie past the end of the file's {data} data bytes; the shard "
            "is cut off or corrupt (download it again)"
        )
    item = _DTYPES[entry["dtype"]].itemsize if entry["dtype"] in _DTYPES else None
    if item is not None and end - begin != math.prod(entry["shape"]) * item:
        raise InputError(
            f"{where}: {end - begin} bytes for shape {tuple(entry['shape'])} of {entry['dtype']} "
            f"({math.prod(entry['shape']) * item} expected); the shard is corrupt"
        )


def _convert_file(src: Path, dst: Path, layouts: Mapping[str, ParamLayout], forward: bool) -> dict[str, Any]:
    with open(src, "rb") as f:
        header, start = _read_header(f, src)
        meta = header.pop("__metadata__", None)
        entries = sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])
        plan, offset, moved = [], 0, 0
        for name, entry in entries:
            how = _how(name, entry, layouts.get(name), forward, src)
            shape = how[1] if how else entry["shape"]
            nbytes = entry["data_offsets"][1] - entry["data_offsets"][0]
            plan.append((name, entry, how))
            header[name] = {"dtype": entry["dtype"], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            moved += nbytes if how and how[0] else 0
        if meta is not None:
            header["__metadata__"] = meta
        with open(dst, "wb") as out:
            _write_header(out, header)
            for _name, entry, how in plan:
                begin, end = (start + o for o in entry["data_offsets"])
                if how and how[0]:
                    _write_tensor(out, _converted(f, begin, end, entry, how[2], forward))
                else:
                    _copy_bytes(f, out, begin, end)
    return {
        "names": {name for name, _, _ in plan},
        "tensors": len(plan),
        "total_bytes": offset,
        "converted": sum(1 for _, _, how in plan if how),
        "moved_bytes": moved,
    }


def _how(
    name: str, entry: Mapping[str, Any], layout: ParamLayout | None, forward: bool, src: Path
) -> tuple[bool, tuple[int, ...], ParamLayout] | None:
    """None to copy the tensor as it is; else (whether its bytes move, its new shape, its layout)."""
    if layout is None:
        return None
    have, want = (layout.original, layout.rewritten) if forward else (layout.rewritten, layout.original)
    if tuple(entry["shape"]) != have[0]:
        fmt = "original" if forward else "rewritten"
        raise InputError(
            f"{src.name}: {name} has shape {tuple(entry['shape'])}, the {fmt} model's is {have[0]}; "
            f"is this checkpoint in the {fmt} format, and of this model?"
        )
    if entry["dtype"] not in _DTYPES:
        raise InputError(f"{src.name}: {name} has dtype {entry['dtype']}, which fxsurgery cannot convert")
    same = all(_plain(v) for v in (have, want)) and math.prod(have[0]) == math.prod(want[0])
    return not same, want[0], layout


def _plain(view: tuple[tuple[int, ...], tuple[int, ...], int]) -> bool:
    """A view that reads its elements contiguously from offset 0: its bytes are those of a flat buffer."""
    shape, stride, offset = view
    step = 1
    for d, s in zip(reversed(shape), reversed(stride)):
        if d != 1 and s != step:
            return False
        step *= d
    return offset == 0


def _converted(
    f: BinaryIO, begin: int, end: int, entry: Mapping[str, Any], layout: ParamLayout, forward: bool
) -> torch.Tensor:
    f.seek(begin)
    raw = bytearray(f.read(end - begin))
    if len(raw) != end - begin:
        raise InputError(
            f"{Path(f.name).name}: {end - begin} bytes expected at offset {begin}, {len(raw)} read: the "
            "file changed or is cut off"
        )
    t = torch.frombuffer(raw, dtype=_DTYPES[entry["dtype"]]).reshape(entry["shape"]) if raw else torch.empty(0)
    return (layout.to_rewritten(t) if forward else layout.to_original(t)).contiguous()


def _write_header(out: BinaryIO, header: Mapping[str, Any]) -> None:
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as the safetensors writer pads it
    out.write(len(text).to_bytes(8, "little"))
    out.write(text)


def _write_tensor(out: BinaryIO, t: torch.Tensor) -> None:
    if t.numel():
        out.write(t.reshape(-1).view(torch.uint8).numpy().data)


def _copy_bytes(f: BinaryIO, out: BinaryIO, begin: int, end: int) -> None:
    """Bytes ``begin:end`` of ``f`` appended to ``out``: by the kernel (``copy_file_range``, no copy through Python)
    where the system has it, else in chunks."""
    out.flush()
    start, done = out.tell(), 0
    try:
        while done < end - begin:
            n = os.copy_file_range(f.fileno(), out.fileno(), end - begin - done, begin + done, start + done)
            if n == 0:
                raise OSError("copy_file_range copied nothing")
            done += n
    except (AttributeError, OSError):  # no copy_file_range (not Linux, another file system): through Python
        f.seek(begin + done)
        out.seek(start + done)
        while done < end - begin:
            chunk = f.read(min(end - begin - done, _CHUNK))
            if not chunk:  # the end of the file before the end of the tensor: never loop on nothing
                raise InputError(
                    f"{Path(f.name).name}: the file ends at byte {begin + done}, inside a tensor that "
                    f"ends at byte {end}; it is cut off (download it again)"
                ) from None
            out.write(chunk)
            done += len(chunk)
    out.seek(start + done)
