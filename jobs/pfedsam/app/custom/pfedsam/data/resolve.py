"""Where a site's data folder is: the configured root, or the generated synthetic default."""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from pathlib import Path

from ..config import PFedSAMConfig


def synthetic_root(cfg: PFedSAMConfig) -> Path:
    """The synthetic multi-site set for ``cfg``, generated on first use (safe across processes)."""
    from .synth import LAYOUT_VERSION, write_synthetic_sites

    d = cfg.data
    base = Path(d.synthetic_dir).expanduser()
    root = base / f"synthetic-v{LAYOUT_VERSION}-s{d.synthetic_sites}-n{d.synthetic_per_site}-seed{cfg.train.seed}"
    if (root / "manifest.json").is_file():
        return root
    base.mkdir(parents=True, exist_ok=True)
    with open(base / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # several site processes may start at once
        if not (root / "manifest.json").is_file():
            tmp = Path(tempfile.mkdtemp(dir=base, prefix=".tmp-"))
            try:
                write_synthetic_sites(tmp / "set", sites=d.synthetic_sites, per_site=d.synthetic_per_site,
                                      seed=cfg.train.seed)
                os.replace(tmp / "set", root)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return root


def site_folder_name(cfg: PFedSAMConfig, site_name: str) -> str:
    """Folder of a FLARE site under the data root: the ``data.sites`` mapping, else the site name.

    With the synthetic default, FLARE's simulator names (site-1, site-2, ...) match the
    generated folders directly.
    """
    return cfg.data.sites.get(site_name, site_name)


def resolve_site_dir(cfg: PFedSAMConfig, site_name: str) -> Path:
    """The data folder of ``site_name``; raise FileNotFoundError naming what was looked for."""
    root = Path(cfg.data.root).expanduser() if cfg.data.root else synthetic_root(cfg)
    folder = root / site_folder_name(cfg, site_name)
    if not folder.is_dir():
        known = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        raise FileNotFoundError(
            f"site '{site_name}': data folder {folder} does not exist (data root {root} has: "
            f"{', '.join(known) or 'nothing'}); map it with data.sites in the config"
        )
    return folder
