"""Writing files atomically: a crash, a kill or a full disk mid-write never
leaves a half-written file under the real name, nor destroys the previous one."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable


def _temporary_prefix(path: Path) -> str:
    return f".{path.name}."


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` on a temporary file in the target's directory
    (so the rename cannot cross file systems), flush it to disk, then rename
    it over ``path``. On any error the temporary file is removed and the
    target is untouched; a process killed mid-write leaves only the hidden
    temporary (``.NAME.*.tmp``), which :func:`remove_stale_temporaries` clears."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_temporary_prefix(path), suffix=".tmp")
    os.close(fd)
    try:
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)  # mkstemp makes 0600; give the file the usual mode
        write(tmp)
        with open(tmp, "rb+") as f:  # the bytes reach the disk before the name points at them
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Delete the temporaries that :func:`atomic_write` left beside ``path``
    when its process was killed mid-write; returns what was removed. Call it
    only where no other process is writing ``path``."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    prefix = _temporary_prefix(path)
    stale = [p for p in path.parent.iterdir() if p.name.startswith(prefix) and p.name.endswith(".tmp") and p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def write_json(path: str | os.PathLike, record) -> Path:
    """``record`` as indented JSON, written atomically (:func:`atomic_write`)."""
    import json

    return atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(record, indent=2) + "\n"))
