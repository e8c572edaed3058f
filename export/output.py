"""Atomic output directories: build in a temp dir next to the target, then swap it in.

An existing output directory is replaced only if it is empty or holds a previous export
(a ``manifest.json`` of our format and nothing but the files an export writes), and it is
never half-overwritten: it is renamed aside, the new directory renamed into place, and only
then the old one deleted (restored if the swap fails).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from mpismoe_edge.runtime.spec import EXPORT_FILES, FORMAT_PREFIX, MANIFEST_FILE


class OutputError(ValueError):
    """The output path cannot be used (a file, a foreign non-empty directory, ...)."""


def check_target(out: Path) -> None:
    """Raise OutputError unless ``out`` may be created or replaced by an export."""
    if out.exists() or out.is_symlink():
        if not out.is_dir() or out.is_symlink():
            raise OutputError(f"{out} exists and is not a directory")
        entries = {p.name for p in out.iterdir()}
        if not entries:
            return
        if MANIFEST_FILE not in entries or entries - EXPORT_FILES:
            raise OutputError(
                f"{out} exists and is not an mpismoe-edge export; refusing to replace it "
                "(choose a new or empty directory)"
            )
        try:
            fmt = json.loads((out / MANIFEST_FILE).read_text(encoding="utf-8")).get("format", "")
        except (OSError, ValueError, AttributeError):
            fmt = ""
        if not str(fmt).startswith(FORMAT_PREFIX):
            raise OutputError(f"{out} holds a manifest.json that is not an mpismoe-edge export; refusing to replace it")


@contextmanager
def staging_dir(out: Path):
    """Yield a fresh temp dir next to ``out``; it is removed unless :func:`commit` took it."""
    out = Path(out)
    check_target(out)
    created = []
    parent = out.parent
    while not parent.exists():
        created.append(parent)
        parent = parent.parent
    for p in reversed(created):
        p.mkdir()
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes 0700; the result should look like a normal mkdir
    ok = False
    try:
        yield tmp
        ok = True
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if not ok:
            for p in created:  # innermost first; only ones we made and left empty
                try:
                    p.rmdir()
                except OSError:
                    break


def commit(tmp: Path, out: Path) -> None:
    """Move the finished ``tmp`` to ``out``, replacing a previous export there."""
    out = Path(out)
    check_target(out)  # re-check: something may have appeared while we worked
    if not out.exists():
        os.replace(tmp, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    old.rmdir()
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)
