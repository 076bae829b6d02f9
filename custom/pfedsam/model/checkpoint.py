"""A site model folder: ``config.yaml`` + ``weights.pt`` (global + local state + meta).

This is what a site keeps after federated training and what ``pfedsam export`` /
``pfedsam predict`` read. Frozen backbone weights are not copied: they come from the
backbone's own checkpoint named in the config.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..config import ConfigError, PFedSAMConfig, dump_config, load_config
from ..fileio import atomic_write
from .pfedsam import PFedSAM, build_pfedsam
from .registry import global_state, load_global_state, load_local_state, local_state

CONFIG_FILE = "config.yaml"
WEIGHTS_FILE = "weights.pt"


def atomic_torch_save(obj: object, path: str | Path, backup: bool = False) -> None:
    """torch.save to a temp file in the same folder, then rename over ``path`` (never torn).

    ``backup`` keeps the previous file as ``<path>.bak``.
    """
    atomic_write(path, lambda tmp: torch.save(obj, tmp), backup=backup)


def non_finite(state: dict) -> list[str]:
    """Names of the tensors / arrays in ``state`` holding NaN or Inf."""
    return [k for k, v in state.items() if not bool(torch.isfinite(torch.as_tensor(v)).all())]


def save_site_model(
    model: PFedSAM, cfg: PFedSAMConfig, out_dir: str | Path, meta: dict[str, Any] | None = None
) -> Path:
    """Write ``config.yaml`` and ``weights.pt`` (global + local parameters and ``meta``)."""
    out = Path(out_dir)
    bad = non_finite({**global_state(model), **local_state(model)})
    if bad:
        raise ValueError(f"refusing to save a model with NaN/Inf in {len(bad)} tensor(s), e.g. '{bad[0]}' ({out})")
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_FILE).write_text(dump_config(cfg))
    atomic_torch_save({"global": global_state(model), "local": local_state(model), "meta": dict(meta or {})},
                      out / WEIGHTS_FILE)
    return out


def read_site_model(model_dir: str | Path) -> tuple[PFedSAMConfig, dict[str, Any]]:
    """The config and the saved ``{"global", "local", "meta"}`` states of a site model folder, checked
    but not built into a model; errors name the file at fault."""
    folder = Path(model_dir)
    cfg_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    for path in (cfg_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"{folder} is not a site model folder: {path.name} is missing")
    cfg = load_config(cfg_path)
    try:
        saved = torch.load(weights_path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError(f"{weights_path}: cannot be read as pFedSAM weights: {exc}") from None
    if not isinstance(saved, dict) or "global" not in saved or "local" not in saved:
        raise ConfigError(f"{weights_path}: expected a dict with 'global' and 'local' states")
    return cfg, saved


def load_site_model(model_dir: str | Path, device: str | torch.device = "cpu") -> tuple[PFedSAM, PFedSAMConfig, dict]:
    """Rebuild a personalized model from a site model folder; errors name the file at fault."""
    cfg, saved = read_site_model(model_dir)
    weights_path = Path(model_dir) / WEIGHTS_FILE
    model = build_pfedsam(cfg)
    load_global_state(model, saved["global"], source=str(weights_path))
    load_local_state(model, saved["local"], source=str(weights_path))
    return model.to(device).eval(), cfg, dict(saved.get("meta", {}))
