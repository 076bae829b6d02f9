"""A site's images and masks: discovery, splits, checks with clear errors, the Dataset.

Layout: ``<site>/images/<id>.<png|jpg|jpeg>``, ``<site>/masks/<id>.png`` and optionally
``<site>/split.json`` with ``train``/``val``/``test`` id lists. Every file is checked once,
up front, so a bad file is reported by name instead of failing deep inside a training step.
"""

from __future__ import annotations

import json
import logging
import random
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .transforms import NORMALIZATIONS, mask_box, preprocess_image, preprocess_mask, training_augmentation

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
MASK_CONVENTIONS = ("nonzero", "zero", "below_max")
SPLITS = ("train", "val", "test")


class SiteDataError(ValueError):
    """Bad site data; the message names the file or folder and what is wrong."""


@dataclass
class BadFile:
    path: Path
    reason: str


def discover_sites(data_root: str | Path) -> list[str]:
    """Sorted names of the site folders (those with an ``images/`` folder) under ``data_root``."""
    root = Path(data_root).expanduser()
    if not root.is_dir():
        raise SiteDataError(f"data root {root} does not exist or is not a folder")
    sites = sorted(p.name for p in root.iterdir() if (p / "images").is_dir())
    if not sites:
        raise SiteDataError(f"data root {root} has no site folders (expected <site>/images/ and <site>/masks/)")
    return sites


def _files_by_id(folder: Path) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES:
            if p.stem in out:
                raise SiteDataError(f"{folder}: two files share the id '{p.stem}': {out[p.stem].name}, {p.name}")
            out[p.stem] = p
    return out


def _pairs(site_dir: Path) -> tuple[dict[str, tuple[Path, Path]], list[BadFile]]:
    """Image/mask pairs by id, plus the orphans (an image with no mask, a mask with no image)."""
    if not site_dir.is_dir():
        raise SiteDataError(f"site folder {site_dir} does not exist")
    for sub in ("images", "masks"):
        if not (site_dir / sub).is_dir():
            raise SiteDataError(f"site folder {site_dir} has no {sub}/ folder")
    images, masks = _files_by_id(site_dir / "images"), _files_by_id(site_dir / "masks")
    orphans = [BadFile(images[i], "image has no mask") for i in sorted(set(images) - set(masks))]
    orphans += [BadFile(masks[i], "mask has no image") for i in sorted(set(masks) - set(images))]
    pairs = {i: (images[i], masks[i]) for i in sorted(set(images) & set(masks))}
    return pairs, orphans


def load_split(site_dir: str | Path, seed: int = 0, fractions: tuple = (0.7, 0.15, 0.15)) -> dict[str, list[str]]:
    """``split.json`` when present (validated), else a seeded split of the sorted ids.

    Arguments:
      site_dir: the site folder.
      seed: seeds the shuffle of the fallback split.
      fractions: train/val/test fractions of the fallback split.
    """
    site_dir = Path(site_dir)
    pairs, _ = _pairs(site_dir)
    path = site_dir / "split.json"
    if path.is_file():
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise SiteDataError(f"{path}: not valid JSON: {exc}") from None
        if not isinstance(raw, dict):
            raise SiteDataError(f"{path}: expected an object with train/val/test lists")
        split = {}
        for name in SPLITS:
            ids = raw.get(name)
            if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
                raise SiteDataError(f"{path}: '{name}' must be a list of image ids")
            split[name] = ids
        seen: dict[str, str] = {}
        for name in SPLITS:
            for i in split[name]:
                if i in seen:
                    raise SiteDataError(f"{path}: id '{i}' is in both '{seen[i]}' and '{name}'")
                seen[i] = name
        return split
    ids = sorted(pairs)
    random.Random(seed).shuffle(ids)
    n = len(ids)
    n_val = max(1, round(n * fractions[1])) if n >= 3 and fractions[1] > 0 else 0
    n_test = max(1, round(n * fractions[2])) if n >= 3 and fractions[2] > 0 else 0
    n_train = n - n_val - n_test
    return {"train": sorted(ids[:n_train]), "val": sorted(ids[n_train:n_train + n_val]),
            "test": sorted(ids[n_train + n_val:])}


def _read(path: Path, what: str) -> np.ndarray:
    """Decode a whole file; SiteDataError naming it when unreadable or truncated."""
    try:
        with Image.open(path) as im:
            im.load()
            return np.asarray(im)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise SiteDataError(f"{path}: cannot read {what} ({exc})") from None


def _to_rgb(array: np.ndarray, path: Path) -> np.ndarray:
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    elif array.ndim == 3 and array.shape[2] == 4:
        array = array[..., :3]
    elif array.ndim == 3 and array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    if array.ndim != 3 or array.shape[2] != 3:
        raise SiteDataError(f"{path}: image must have 1, 3 or 4 channels, got shape {array.shape}")
    if array.dtype != np.uint8:
        a = array.astype(np.float64)
        array = ((a - a.min()) / max(a.max() - a.min(), 1e-8) * 255).astype(np.uint8)
    return array


def _foreground(mask: np.ndarray, convention: str) -> np.ndarray:
    m = mask[..., 0] if mask.ndim == 3 else mask
    if convention == "nonzero":
        return (m > 0).astype(np.uint8)
    if convention == "zero":
        return (m == 0).astype(np.uint8)
    return (m < np.iinfo(m.dtype).max if m.dtype.kind in "ui" else m < m.max()).astype(np.uint8)


class SiteDataset(torch.utils.data.Dataset):
    """One split of one site, preprocessed for a SAM-style model.

    Items are dicts: ``id``; ``image`` ``(3, S, S)`` float; ``mask`` ``(1, S, S)`` in {0, 1};
    ``box`` ``(4,)`` x0, y0, x1, y1 in the S x S frame; ``valid_hw`` and ``orig_hw``.

    Arguments:
      site_dir: the site folder.
      split: ``train``, ``val``, ``test`` or ``all``.
      image_size: model input side S.
      normalization: ``minmax`` or ``sam`` (see transforms.preprocess_image).
      augment: light random augmentation in ``__getitem__`` (``plain_sample`` never augments).
      mask_convention: foreground rule: ``nonzero``, ``zero`` or ``below_max``.
      on_bad_file: ``error`` (raise SiteDataError) or ``skip`` (warn, list in ``skipped``).
      seed: seeds the fallback split and the augmentation.
      split_fractions: fractions of the fallback split.
      ids: use exactly these ids instead of the split's.
    """

    def __init__(
        self, site_dir: str | Path, split: str = "train", image_size: int = 256, normalization: str = "minmax",
        augment: bool = False, mask_convention: str = "nonzero", on_bad_file: str = "error", seed: int = 0,
        split_fractions: tuple = (0.7, 0.15, 0.15), ids: list[str] | None = None,
    ) -> None:
        checks = ((split, (*SPLITS, "all"), "split"), (normalization, NORMALIZATIONS, "normalization"),
                  (mask_convention, MASK_CONVENTIONS, "mask_convention"),
                  (on_bad_file, ("error", "skip"), "on_bad_file"))
        for value, allowed, key in checks:
            if value not in allowed:
                raise SiteDataError(f"{key} must be one of {', '.join(allowed)}, got {value!r}")
        self.site_dir = Path(site_dir).expanduser()
        self.image_size = image_size
        self.normalization = normalization
        self.mask_convention = mask_convention
        self.augment = augment
        self.skipped: list[BadFile] = []
        pairs, orphans = _pairs(self.site_dir)
        if ids is None:
            if split == "all":
                ids = sorted(pairs)
            else:
                ids = load_split(self.site_dir, seed, split_fractions)[split]
        unknown = [i for i in ids if i not in pairs and not any(o.path.stem == i for o in orphans)]
        if unknown:
            raise SiteDataError(f"{self.site_dir}: {len(unknown)} listed id(s) have no image/mask pair, "
                                f"e.g. '{unknown[0]}' (check split.json)")
        problems: list[BadFile] = list(orphans)  # always reported, whatever the split
        self.ids: list[str] = []
        self._arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for i in ids:
            if i not in pairs:
                continue
            image_path, mask_path = pairs[i]
            try:
                image = _to_rgb(_read(image_path, "image"), image_path)
            except SiteDataError as exc:
                problems.append(BadFile(image_path, str(exc)))
                continue
            try:
                mask = _read(mask_path, "mask")
            except SiteDataError as exc:
                problems.append(BadFile(mask_path, str(exc)))
                continue
            if mask.shape[:2] != image.shape[:2]:
                problems.append(BadFile(mask_path, f"mask is {mask.shape[1]}x{mask.shape[0]} but its image "
                                                   f"{image_path.name} is {image.shape[1]}x{image.shape[0]}"))
                continue
            self.ids.append(i)
            self._arrays[i] = (image, _foreground(mask, mask_convention))
        if problems:
            if on_bad_file == "error":
                listing = "; ".join(p.reason if str(p.path) in p.reason else f"{p.path}: {p.reason}"
                                    for p in problems)
                raise SiteDataError(f"site {self.site_dir.name}: {len(problems)} bad file(s): {listing} "
                                    "(set data.on_bad_file: skip to skip them)")
            for p in problems:
                warnings.warn(f"skipping {p.path}: {p.reason}", stacklevel=2)
            self.skipped = problems
        if not self.ids:
            raise SiteDataError(f"site {self.site_dir}: split '{split}' has no usable image/mask pairs")
        self._augmentation = training_augmentation(seed) if augment else None

    def __len__(self) -> int:
        return len(self.ids)

    def plain_sample(self, index: int) -> dict:
        """The preprocessed sample without augmentation (deterministic)."""
        image, mask = self._arrays[self.ids[index]]
        x, valid = preprocess_image(image, self.image_size, self.normalization)
        m = preprocess_mask(mask, self.image_size)
        return {"id": self.ids[index], "image": x, "mask": m, "box": mask_box(m, valid),
                "valid_hw": torch.tensor(valid), "orig_hw": torch.tensor(image.shape[:2])}

    def load_image(self, index: int) -> torch.Tensor:
        return self.plain_sample(index)["image"]

    def __getitem__(self, index: int) -> dict:
        sample = self.plain_sample(index)
        if self._augmentation is not None:
            out = self._augmentation({"image": sample["image"], "mask": sample["mask"]})
            sample["image"] = torch.as_tensor(out["image"]).float()
            sample["mask"] = torch.as_tensor(out["mask"]).float()
            sample["box"] = mask_box(sample["mask"], (self.image_size, self.image_size))
        return sample
