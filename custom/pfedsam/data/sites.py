"""A site's images and masks: discovery, splits, checks with clear errors, the Dataset.

Layout: ``<site>/images/<id>.<png|jpg|jpeg|...>``, ``<site>/masks/<id>.png`` and optionally
``<site>/split.json`` with ``train``/``val``/``test`` id lists. Every file of the requested
split is decoded once, fully, up front, so a bad file is reported by name in ``__init__``
instead of failing deep inside a training step.
"""

from __future__ import annotations

import json
import logging
import math
import random
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .transforms import (
    NORMALIZATIONS,
    augment_valid_region,
    mask_box,
    preprocess_image,
    preprocess_mask,
    training_augmentation,
)

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
MASK_CONVENTIONS = ("nonzero", "zero", "below_max")
SPLITS = ("train", "val", "test")
ON_BAD_FILE = ("error", "skip")
# Decoded arrays are kept in memory up to this many bytes per dataset; the rest is re-read on use.
CACHE_BYTES = 1 << 30
_MAX_LISTED = 20
# Largest image decoded (width x height): 12000 x 12000 would take 430 MB as RGB and only get a
# PIL warning; anything above this is refused with a clear error (override: raise this constant).
MAX_IMAGE_PIXELS = 64_000_000
LOSSY_MASK_SUFFIXES = (".jpg", ".jpeg")


class SiteDataError(ValueError):
    """Bad site data or arguments; the message names the file, folder or parameter and the problem."""


@dataclass
class BadFile:
    """A file that cannot be used, and why."""

    path: Path
    reason: str


def _choice(value: object, allowed: tuple[str, ...], key: str) -> None:
    if value not in allowed:
        raise SiteDataError(f"{key} must be one of {', '.join(allowed)}, got {value!r}")


def discover_sites(data_root: str | Path) -> list[str]:
    """Sorted names of the site folders (those with an ``images/`` folder) under ``data_root``.

    Arguments:
      data_root: folder holding one sub-folder per site.
    """
    root = Path(data_root).expanduser()
    if not root.exists():
        raise SiteDataError(f"data root {root} does not exist")
    if not root.is_dir():
        raise SiteDataError(f"data root {root} is not a folder")
    sites = sorted(p.name for p in root.iterdir() if (p / "images").is_dir())
    if not sites:
        raise SiteDataError(f"data root {root} has no site folders (expected <site>/images/ and <site>/masks/)")
    return sites


def _files_by_id(folder: Path) -> tuple[dict[str, Path], list[BadFile]]:
    """Image files of ``folder`` by id (file stem); ids shared by two files are bad."""
    groups: dict[str, list[Path]] = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES:
            groups.setdefault(p.stem, []).append(p)
    out = {i: ps[0] for i, ps in groups.items() if len(ps) == 1}
    bad = [BadFile(p, f"{len(ps)} files in {folder.name}/ share the id '{i}' ({', '.join(q.name for q in ps)})")
           for i, ps in groups.items() if len(ps) > 1 for p in ps]
    return out, bad


def _scan(site_dir: Path) -> tuple[dict[str, tuple[Path, Path]], list[BadFile], set[str]]:
    """Image/mask pairs by id, the bad files (orphans, clashing ids) and every id with any file."""
    if not site_dir.exists():
        raise SiteDataError(f"site folder {site_dir} does not exist")
    if not site_dir.is_dir():
        raise SiteDataError(f"site folder {site_dir} is not a folder")
    for sub in ("images", "masks"):
        if not (site_dir / sub).is_dir():
            raise SiteDataError(f"site folder {site_dir} has no {sub}/ folder")
    images, bad_images = _files_by_id(site_dir / "images")
    masks, bad_masks = _files_by_id(site_dir / "masks")
    clashing = {b.path.stem for b in bad_images + bad_masks}
    bad = bad_images + bad_masks
    bad += [BadFile(images[i], "image has no mask") for i in sorted(set(images) - set(masks) - clashing)]
    bad += [BadFile(masks[i], "mask has no image") for i in sorted(set(masks) - set(images) - clashing)]
    pairs = {i: (images[i], masks[i]) for i in sorted((set(images) & set(masks)) - clashing)}
    return pairs, bad, set(images) | set(masks) | clashing


def _check_fractions(fractions: object) -> tuple[float, float, float]:
    try:
        f = tuple(float(x) for x in fractions)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        f = ()
    if len(f) != 3 or not all(math.isfinite(x) and x >= 0 for x in f) or f[0] <= 0 or abs(sum(f) - 1) > 1e-3:
        raise SiteDataError(f"fractions (split_fractions) must be three numbers >= 0 for train/val/test with "
                            f"train > 0, summing to 1; got {fractions!r}")
    return f  # type: ignore[return-value]


def _seeded_split(ids: list[str], seed: int, fractions: tuple[float, float, float]) -> dict[str, list[str]]:
    """Shuffle the sorted ids with ``seed``; every split with a positive fraction is non-empty when possible."""
    ids = sorted(ids)
    random.Random(seed).shuffle(ids)
    n = len(ids)
    wanted = [k for k in (1, 2) if fractions[k] > 0]
    counts = [0, 0, 0]
    if n >= 1 + len(wanted):
        for k in wanted:
            counts[k] = max(1, round(n * fractions[k]))
        while n - counts[1] - counts[2] < 1:  # train keeps at least one id
            k = 1 if counts[1] >= counts[2] else 2
            counts[k] -= 1
    n_train, n_val = n - counts[1] - counts[2], counts[1]
    return {"train": sorted(ids[:n_train]), "val": sorted(ids[n_train:n_train + n_val]),
            "test": sorted(ids[n_train + n_val:])}


def _read_split_json(path: Path, known: set[str]) -> dict[str, list[str]]:
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise SiteDataError(f"{path}: cannot read ({exc})") from None
    except json.JSONDecodeError as exc:
        raise SiteDataError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise SiteDataError(f"{path}: expected a JSON object with 'train', 'val' and 'test' id lists, "
                            f"got {type(raw).__name__}")
    split: dict[str, list[str]] = {}
    for name in SPLITS:
        if name not in raw:
            raise SiteDataError(f"{path}: missing the '{name}' list (needs 'train', 'val' and 'test')")
        ids = raw[name]
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise SiteDataError(f"{path}: '{name}' must be a list of image ids (strings), got {ids!r:.80}")
        split[name] = ids
    seen: dict[str, str] = {}
    for name in SPLITS:
        for i in split[name]:
            if i in seen:
                where = f"twice in '{name}'" if seen[i] == name else f"in both '{seen[i]}' and '{name}'"
                raise SiteDataError(f"{path}: id '{i}' is {where}")
            seen[i] = name
    for name in SPLITS:
        missing = [i for i in split[name] if i not in known]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise SiteDataError(f"{path}: '{name}' lists id '{missing[0]}'{more} but {path.parent} has no "
                                f"images/{missing[0]}.* or masks/{missing[0]}.*")
    return split


def load_split(
    site_dir: str | Path, seed: int = 0, fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)
) -> dict[str, list[str]]:
    """The site's train/val/test ids: ``split.json`` when present (validated), else a seeded split.

    The seeded split shuffles the sorted ids of the image/mask pairs with ``seed``; every split
    with a positive fraction gets at least one id when there are enough (3 ids for the default).

    Arguments:
      site_dir: the site folder.
      seed: seeds the shuffle of the fallback split.
      fractions: train/val/test fractions of the fallback split (sum 1).
    Returns:
      ``{"train": [...], "val": [...], "test": [...]}``.
    """
    site_dir = Path(site_dir).expanduser()
    pairs, _, known = _scan(site_dir)
    path = site_dir / "split.json"
    if path.is_file():
        return _read_split_json(path, known)
    if not pairs:
        raise SiteDataError(f"site folder {site_dir} has no image/mask pairs to split")
    return _seeded_split(list(pairs), seed, _check_fractions(fractions))


def check_pixels(size: tuple[int, int], path: Path, what: str = "image") -> None:
    """Refuse an image larger than MAX_IMAGE_PIXELS before it is decoded."""
    w, h = size
    if w * h > MAX_IMAGE_PIXELS:
        raise SiteDataError(f"{path}: {what} is {w}x{h} = {w * h / 1e6:.0f} M pixels, above the limit of "
                            f"{MAX_IMAGE_PIXELS / 1e6:.0f} M (pfedsam.data.sites.MAX_IMAGE_PIXELS); downscale it first")


def _open(path: Path, what: str) -> Image.Image:
    """Open and fully decode a file; SiteDataError naming it when unreadable, truncated or too large."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit applies
            with Image.open(path) as im:
                check_pixels(im.size, path, what)
                im.load()
                return im.copy()
    except SiteDataError:
        raise
    except Exception as exc:  # PIL raises many types for corrupt files; report them all by name
        raise SiteDataError(f"{path}: cannot read {what} ({type(exc).__name__}: {exc})") from None


def _to_uint8(a: np.ndarray) -> np.ndarray:
    if a.dtype == np.uint8:
        return a
    if a.dtype == bool:
        return a.astype(np.uint8) * 255
    a = a.astype(np.float64)
    return np.round((a - a.min()) / max(float(a.max() - a.min()), 1e-8) * 255).astype(np.uint8)


def _read_image(path: Path) -> np.ndarray:
    """An image file as ``H x W x 3`` uint8 (grayscale repeated, alpha dropped, 16-bit min-max scaled)."""
    im = _open(path, "image")
    try:
        if im.mode in ("P", "PA"):
            im = im.convert("RGBA")
        elif im.mode in ("CMYK", "YCbCr", "LAB", "HSV", "RGBX"):
            im = im.convert("RGB")
        a = np.asarray(im)
    except Exception as exc:
        raise SiteDataError(f"{path}: cannot convert image of mode {im.mode} ({exc})") from None
    if a.ndim == 3 and a.shape[2] == 2:  # LA: gray + alpha
        a = a[..., 0]
    elif a.ndim == 3 and a.shape[2] == 4:  # RGBA
        a = a[..., :3]
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    if a.ndim == 2:
        a = np.repeat(_to_uint8(a)[..., None], 3, axis=2)
    if a.ndim != 3 or a.shape[2] != 3:
        raise SiteDataError(f"{path}: image must have 1, 3 or 4 channels, got shape {a.shape}")
    return np.ascontiguousarray(_to_uint8(a))


def _read_mask(path: Path) -> np.ndarray:
    """A mask file as ``H x W`` or ``H x W x C`` (colour channels kept, alpha dropped); never JPEG.

    JPEG is refused: its lossy compression changes label values along every edge.
    """
    if path.suffix.lower() in LOSSY_MASK_SUFFIXES:
        raise SiteDataError(f"{path}: mask is a JPEG file; lossy compression alters label values at the edges: "
                            "save masks as PNG")
    im = _open(path, "mask")
    if im.mode in ("LA", "RGBA", "PA"):
        im = im.convert("L" if im.mode == "LA" else "RGB") if im.mode != "PA" else im.convert("P")
    a = np.asarray(im)
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    return a


def _foreground(mask: np.ndarray, convention: str) -> np.ndarray:
    """Binary ``H x W`` uint8 foreground of a mask under ``convention``.

    ``nonzero``: mask > 0; ``zero``: mask == 0; ``below_max``: mask below the format's maximum
    (255 for 8-bit, 65535 for 16-bit; the mask's own maximum for other types). A colour mask
    counts every channel: a pixel is non-zero when ANY channel is (a green foreground is
    foreground), and below the maximum when any channel is.
    """
    if mask.ndim == 3:
        mask = mask.min(axis=2) if convention == "below_max" else mask.max(axis=2)
    if convention == "nonzero":
        return (mask > 0).astype(np.uint8)
    if convention == "zero":
        return (mask == 0).astype(np.uint8)
    top = np.iinfo(mask.dtype).max if mask.dtype in (np.uint8, np.uint16) else mask.max()
    return (mask < top).astype(np.uint8)


class SiteDataset(torch.utils.data.Dataset):
    """One split of one site, preprocessed for a SAM-style model.

    Items are dicts: ``id`` (str); ``image`` float32 ``(3, S, S)``; ``mask`` float32 ``(1, S, S)``
    in {0, 1}; ``box`` float32 ``(4,)`` x0, y0, x1, y1 (exclusive) of the foreground in the
    S x S frame (the whole valid region when the mask is empty); ``valid_hw`` int64 ``(2,)``
    (h, w) of the un-padded resized region; ``orig_hw`` int64 ``(2,)`` original (h, w).

    Every file of the split (and the site's orphans) is checked in ``__init__``: bad input
    raises SiteDataError naming the files, or with ``on_bad_file="skip"`` is skipped with a
    warning and listed in ``skipped``.

    Arguments:
      site_dir: the site folder (``images/``, ``masks/``, optional ``split.json``).
      split: ``train``, ``val``, ``test`` or ``all`` (every pair, ignoring the split).
      image_size: model input side S.
      normalization: ``minmax`` (LiteMedSAM, per image to [0, 1]) or ``sam`` (ImageNet mean/std
        on the 0-255 scale).
      augment: light random augmentation in ``__getitem__`` (flips, intensity scale/shift, noise);
        meant for the train split. ``load_image`` and ``plain_sample`` never augment.
      mask_convention: foreground rule: ``nonzero`` (polyp), ``zero`` (prostate, inverted masks) or
        ``below_max`` (fundus disc: mask < 255).
      on_bad_file: ``error`` (raise SiteDataError) or ``skip`` (warn, list in ``skipped``).
      seed: seeds the fallback split and the augmentation (re-seeded per DataLoader worker from
        the worker's seed, so workers differ and runs repeat under ``torch.manual_seed``).
      split_fractions: train/val/test fractions of the fallback split.
      ids: use exactly these ids (e.g. a subset of a split) instead of the split's.
    """

    def __init__(
        self, site_dir: str | Path, split: str = "train", image_size: int = 256, normalization: str = "minmax",
        augment: bool = False, mask_convention: str = "nonzero", on_bad_file: str = "error", seed: int = 0,
        split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15), ids: list[str] | None = None,
    ) -> None:
        _choice(split, (*SPLITS, "all"), "split")
        _choice(normalization, NORMALIZATIONS, "normalization")
        _choice(mask_convention, MASK_CONVENTIONS, "mask_convention")
        _choice(on_bad_file, ON_BAD_FILE, "on_bad_file")
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
            raise SiteDataError(f"image_size must be a positive integer, got {image_size!r}")
        self.site_dir = Path(site_dir).expanduser()
        self.split = split
        self.image_size = image_size
        self.normalization = normalization
        self.mask_convention = mask_convention
        self.augment = bool(augment)
        self.seed = seed
        self.skipped: list[BadFile] = []

        pairs, problems, known = _scan(self.site_dir)  # orphans are always reported, whatever the split
        given = ids is not None
        if ids is None:
            if split == "all" or (not pairs and not (self.site_dir / "split.json").is_file()):
                ids = sorted(pairs)
            else:
                ids = load_split(self.site_dir, seed, split_fractions)[split]
        else:
            if isinstance(ids, str) or not all(isinstance(i, str) for i in ids):
                raise SiteDataError(f"ids must be a list of image ids (strings), got {ids!r:.80}")
            unknown = [i for i in ids if i not in known]
            if unknown:
                raise SiteDataError(f"ids: '{unknown[0]}' (of {len(unknown)} unknown) has no images/"
                                    f"{unknown[0]}.* or masks/{unknown[0]}.* in {self.site_dir}")
            ids = list(ids)

        self.ids: list[str] = []
        self._paths: dict[str, tuple[Path, Path]] = {}
        self._cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        cached = 0
        for i in ids:
            if i not in pairs:
                continue  # an orphan or a clashing id: already in problems
            image_path, mask_path = pairs[i]
            try:
                image = _read_image(image_path)
            except SiteDataError as exc:
                problems.append(BadFile(image_path, str(exc).removeprefix(f"{image_path}: ")))
                continue
            try:
                mask = _read_mask(mask_path)
            except SiteDataError as exc:
                problems.append(BadFile(mask_path, str(exc).removeprefix(f"{mask_path}: ")))
                continue
            if mask.shape[:2] != image.shape[:2]:
                problems.append(BadFile(mask_path, f"mask is {mask.shape[1]}x{mask.shape[0]} (WxH) but its image "
                                                   f"{image_path.name} is {image.shape[1]}x{image.shape[0]}"))
                continue
            self.ids.append(i)
            self._paths[i] = (image_path, mask_path)
            if cached + image.nbytes + mask.nbytes <= CACHE_BYTES:
                self._cache[i] = (image, _foreground(mask, mask_convention))
                cached += image.nbytes + mask.nbytes

        if problems:
            listing = "; ".join(f"{p.path}: {p.reason}" for p in problems[:_MAX_LISTED])
            if len(problems) > _MAX_LISTED:
                listing += f"; ... and {len(problems) - _MAX_LISTED} more"
            if on_bad_file == "error":
                raise SiteDataError(f"site {self.site_dir.name}: {len(problems)} bad file(s): {listing} "
                                    "(pass on_bad_file='skip', config data.on_bad_file: skip, to skip them)")
            for p in problems:
                log.info("skipping %s: %s", p.path, p.reason)
            warnings.warn(f"site {self.site_dir.name}: skipping {len(problems)} bad file(s): {listing}", stacklevel=2)
            self.skipped = problems
        if not self.ids:
            if not pairs:
                raise SiteDataError(f"site folder {self.site_dir} has no image/mask pairs (empty site)")
            if not ids:
                source = "the ids argument" if given else (
                    "split.json" if (self.site_dir / "split.json").is_file() else "the seeded split")
                raise SiteDataError(f"site {self.site_dir}: split '{split}' is empty (no ids from {source})")
            raise SiteDataError(f"site {self.site_dir}: split '{split}' has no usable image/mask pairs "
                                f"(all {len(ids)} skipped)")
        self._augmentation = training_augmentation(seed) if self.augment else None
        self._worker_seed: int | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def reseed(self, seed: int) -> None:
        """Restart the augmentation's random stream from ``seed`` (a trainer does this per phase and round).

        Arguments:
          seed: the new seed (also the base of DataLoader workers' streams).
        """
        self.seed = seed
        self._worker_seed = None
        if self._augmentation is not None:
            self._augmentation.set_random_state(seed=seed)

    def _arrays(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        i = self.ids[index]
        if i in self._cache:
            return self._cache[i]
        image_path, mask_path = self._paths[i]
        return _read_image(image_path), _foreground(_read_mask(mask_path), self.mask_convention)

    def load_image(self, index: int) -> torch.Tensor:
        """The preprocessed ``(3, S, S)`` image without augmentation (deterministic).

        Arguments:
          index: position in ``ids``.
        """
        image, _ = self._arrays(index)
        return preprocess_image(image, self.image_size, self.normalization)[0]

    def original_mask(self, index: int) -> np.ndarray:
        """The foreground at the resolution stored on disk, ``H x W`` bool (the site's mask convention).

        Reads only the mask file when the arrays are not held in memory.

        Arguments:
          index: position in ``ids``.
        """
        i = self.ids[index]
        if i in self._cache:
            return self._cache[i][1].astype(bool)
        return _foreground(_read_mask(self._paths[i][1]), self.mask_convention).astype(bool)

    def plain_sample(self, index: int) -> dict:
        """The sample ``__getitem__`` gives with ``augment=False`` (deterministic).

        Arguments:
          index: position in ``ids``.
        """
        image, mask = self._arrays(index)
        x, valid = preprocess_image(image, self.image_size, self.normalization)
        m = preprocess_mask(mask, self.image_size)
        return {"id": self.ids[index], "image": x, "mask": m, "box": mask_box(m, valid),
                "valid_hw": torch.tensor(valid, dtype=torch.int64),
                "orig_hw": torch.tensor(image.shape[:2], dtype=torch.int64)}

    def __getitem__(self, index: int) -> dict:
        sample = self.plain_sample(index)
        if self._augmentation is not None:
            info = torch.utils.data.get_worker_info()
            if info is not None and info.seed != self._worker_seed:  # a fresh worker copy: own stream
                self._worker_seed = info.seed
                state = np.random.SeedSequence([int(self.seed) % 2**32, info.seed % 2**32]).generate_state(1)[0]
                self._augmentation.set_random_state(seed=int(state))
            valid = tuple(sample["valid_hw"].tolist())
            clamp = (0.0, 1.0) if self.normalization == "minmax" else None
            sample["image"], sample["mask"] = augment_valid_region(
                self._augmentation, sample["image"], sample["mask"], valid, clamp)
            sample["box"] = mask_box(sample["mask"], valid)
        return sample
