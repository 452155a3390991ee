"""A folder written in full or not at all: the work goes into a temporary folder beside the destination, which is
renamed into place only when the block completes (a failed run leaves nothing that looks valid)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fxsurgery.errors import InputError

__all__ = ["staged_folder", "file_mode"]


def _umask() -> int:
    """The process's umask (read by setting it, so put back at once; read where files are written, not at import)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def staged_folder(
    out: str | os.PathLike, what: str = "output directory", hint: str = "choose another"
) -> Iterator[Path]:
    """A temporary folder beside ``out`` that becomes ``out`` only if the block completes; ``out`` must not exist or
    be an empty folder. Errors name ``what`` it is and are :class:`~fxsurgery.InputError` (one line)."""
    target = Path(out)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise InputError(f"{what} {out} exists and is not empty; {hint} or remove it")
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.is_dir():
        raise InputError(f"cannot write to {out}: parent directory {parent} does not exist")
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=parent))
    except OSError as e:
        raise InputError(f"cannot write to {out}: {e.strerror or e}") from e
    try:
        yield tmp
        tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it private; the result is an ordinary folder
        if target.exists():
            target.rmdir()
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def file_mode() -> int:
    """The mode an ordinary new file gets under the process's umask."""
    return 0o666 & ~_umask()
