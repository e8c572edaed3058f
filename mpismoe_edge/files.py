"""Files written whole or not at all: a temp file in the same folder, then a rename.

A failed write (a full disk, a kill) leaves the previous file as it was and no temp file behind,
and is one :class:`WriteError` naming the file and the reason. A new file gets the mode every
other file gets (the umask), not ``mkstemp``'s 0600. Torch objects are serialized in memory
first: ``torch.save`` into a file that hits a full disk raises a zip-writer ``RuntimeError``
that says nothing of the disk, where a plain write says ``No space left on device``.
"""

from __future__ import annotations

import io
import json
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

_TEMP_PREFIX = ".{}."  # a temp file's name: this, the writer's pid, a random tag, ".tmp"


class WriteError(OSError):
    """A file could not be written; the message names it and the reason."""


def _write_atomic(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> None:
    """Call ``write`` on a temp file beside ``path``, then rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{_TEMP_PREFIX.format(path.name)}{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as to open()
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise WriteError(f"cannot write {path}: {e.strerror or e}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def remove_leftover_temps(path: str | os.PathLike) -> int:
    """Delete the temp files that writers of ``path`` killed mid-write left beside it (a kill
    skips the cleanup), and say how many; only for a caller that knows none is writing it now."""
    path = Path(path)
    leftovers = list(path.parent.glob(f"{_TEMP_PREFIX.format(path.name)}*.tmp"))
    for tmp in leftovers:
        tmp.unlink(missing_ok=True)
    return len(leftovers)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    _write_atomic(path, lambda f: f.write(data))


def write_json(path: str | os.PathLike, data: Any) -> None:
    write_bytes(path, json.dumps(data, indent=2).encode())


def save_torch(path: str | os.PathLike, obj: Any, buffered: bool = True) -> None:
    """``torch.save(obj)`` to ``path`` atomically, serialized in memory first; ``buffered=False``
    streams it into the temp file instead, for a state too large to hold twice in memory (a full
    fine-tuning's optimizer), and a full disk then raises torch's own error."""
    import torch

    if not buffered:
        _write_atomic(path, lambda f: torch.save(obj, f))
        return
    buf = io.BytesIO()
    torch.save(obj, buf)
    write_bytes(path, buf.getvalue())
