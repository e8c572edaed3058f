"""Atomic output directories: build in a temp dir next to the target, then swap it in.

An existing output directory is replaced only if it is empty or holds a previous export
(a ``manifest.json`` of our format and nothing but the files an export writes), and it is
never half-overwritten: it is renamed aside, the new directory renamed into place, and only
then the old one deleted (restored if the swap fails).

A staging folder is named ``.OUT.tmp-PID@HOST-XXXXXXXX`` after the process that builds it. An
export killed half-way (``kill -9``, a power cut) leaves its folder behind; the next export to
the same ``OUT`` removes it when its owner is gone: a process of this host that no longer runs,
or, for a folder of another host or of the older unnamed form (``.OUT.tmp-XXXXXXXX``), one not
modified for :data:`STALE_AFTER_S`. A live export's folder is never touched, so two exports
into one folder may run at once.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import socket
import tempfile
import time
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


STALE_AFTER_S = 24 * 3600  # no export runs this long: an unattributable staging folder this old is dead
_RANDOM = r"[a-z0-9_]{8}"  # tempfile.mkdtemp's random part


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. EPERM: it runs under another user
        return True
    return True


def _is_stale(folder: Path, out_name: str, now: float) -> bool:
    """Whether ``folder`` is a staging folder of ``out_name`` whose export is gone."""
    owned = re.fullmatch(rf"\.{re.escape(out_name)}\.tmp-(\d+)@(.+)-{_RANDOM}", folder.name)
    if owned is None and not re.fullmatch(rf"\.{re.escape(out_name)}\.tmp-{_RANDOM}", folder.name):
        return False
    if owned is not None and owned.group(2) == _host():
        return not _alive(int(owned.group(1)))
    try:
        return now - folder.lstat().st_mtime > STALE_AFTER_S
    except OSError:
        return False


def remove_stale_staging(out: Path) -> list[Path]:
    """Delete the staging folders of ``out`` left by exports that died (see the module doc);
    returns them."""
    out = Path(out)
    if not out.parent.is_dir():
        return []
    now, removed = time.time(), []
    for folder in sorted(out.parent.glob(f".{glob.escape(out.name)}.tmp-*")):
        if folder.is_dir() and not folder.is_symlink() and _is_stale(folder, out.name, now):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


@contextmanager
def staging_dir(out: Path):
    """Yield a fresh temp dir next to ``out``, named after this process; it is removed unless
    :func:`commit` took it. Stale staging folders of ``out`` are removed first."""
    out = Path(out)
    check_target(out)
    remove_stale_staging(out)
    created = []
    parent = out.parent
    while not parent.exists():
        created.append(parent)
        parent = parent.parent
    for p in reversed(created):
        p.mkdir()
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}@{_host()}-", dir=out.parent))
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
