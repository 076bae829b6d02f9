"""Atomic file writes: a crash or a concurrent reader never sees a half-written file."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def backup_path(path: str | Path) -> Path:
    """Where ``atomic_write(..., backup=True)`` keeps the previous version of ``path``."""
    path = Path(path)
    return path.with_name(path.name + ".bak")


def atomic_write(path: str | Path, write: Callable[[str], None], suffix: str = ".tmp", backup: bool = False) -> Path:
    """Call ``write(tmp_path)`` on a temp file beside ``path``, then rename it over ``path``.

    Arguments:
      path: the final file.
      write: writes the content to the path it is given.
      suffix: temp file suffix (``np.savez`` needs ``.npz`` or it appends one).
      backup: keep the previous ``path`` as ``<path>.bak`` (one generation); a crash between the
        two renames leaves the backup, which readers fall back to.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=suffix)
    os.close(fd)
    try:
        write(tmp)
        if backup and path.exists():
            os.replace(path, backup_path(path))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
