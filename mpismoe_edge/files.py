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
from pathlib import Path
from typing import Any


class WriteError(OSError):
    """A file could not be written; the message names it and the reason."""


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as to open()
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise WriteError(f"cannot write {path}: {e.strerror or e}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: str | os.PathLike, data: Any) -> None:
    write_bytes(path, json.dumps(data, indent=2).encode())


def save_torch(path: str | os.PathLike, obj: Any) -> None:
    """``torch.save(obj)`` to ``path`` atomically (serialized in memory first)."""
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    write_bytes(path, buf.getvalue())
