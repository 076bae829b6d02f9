"""How many torch CPU threads a site process uses: the host's cores, shared among its site processes.

Two simulator clients on a 2-core machine, each with torch's default of 2 threads, run 4
threads on 2 cores; the README's default job took 17 min 48 s that way and 10 min 25 s with
the shared count below (docs/results.md). With
``train.num_threads: 0`` each site process registers itself in a per-user folder under the
temp directory and uses ``cores // live site processes`` threads (at least 1), re-checked
at every phase, so a production site alone on its host gets every core.
"""

from __future__ import annotations

import atexit
import os
import tempfile
from pathlib import Path

import torch


def registry_dir() -> Path:
    return Path(tempfile.gettempdir()) / f"pfedsam-sites-{os.getuid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def register_site_process(folder: Path | None = None) -> Path:
    """Mark this process as a running site (removed at exit); returns the marker file."""
    folder = folder or registry_dir()
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / str(os.getpid())
    if not marker.exists():
        marker.touch()
        atexit.register(marker.unlink, missing_ok=True)
    return marker


def live_site_processes(folder: Path | None = None) -> int:
    """Site processes running on this host now (markers of dead processes are removed)."""
    folder = folder or registry_dir()
    count = 0
    for marker in folder.glob("*") if folder.is_dir() else []:
        if not marker.name.isdigit():
            continue
        if _alive(int(marker.name)):
            count += 1
        else:
            marker.unlink(missing_ok=True)
    return count


def cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def site_threads(requested: int, folder: Path | None = None) -> int:
    """Threads for this site process: ``requested``, or for 0 the cores shared among live site processes.

    Arguments:
      requested: ``train.num_threads`` (0 = automatic).
      folder: the registry folder (default: per user, under the temp directory).
    """
    if requested:
        return requested
    return max(1, cores() // max(1, live_site_processes(folder)))


def apply_site_threads(requested: int) -> int:
    """Set torch's thread count for this site process (see site_threads); returns it."""
    if not requested:
        register_site_process()
    n = site_threads(requested)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n
