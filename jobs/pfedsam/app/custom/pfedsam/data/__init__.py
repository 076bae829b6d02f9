"""Data layer: site discovery, splits, checked loading, preprocessing, synthetic sites."""

from .resolve import resolve_site_dir, synthetic_root
from .sites import MASK_CONVENTIONS, BadFile, SiteDataError, SiteDataset, discover_sites, load_split
from .synth import write_synthetic_sites
from .transforms import preprocess_image, preprocess_mask

__all__ = ["MASK_CONVENTIONS", "BadFile", "SiteDataError", "SiteDataset", "discover_sites", "load_split",
           "preprocess_image", "preprocess_mask", "resolve_site_dir", "synthetic_root", "write_synthetic_sites"]
