"""Preprocessing (SAM convention) and light training augmentation.

SAM convention: resize the longest side to ``S`` keeping the aspect ratio (bilinear for the
image, nearest for the mask), normalize the resized (valid) region, then pad bottom/right
with zeros to ``S x S``. Augmentation only ever touches the valid region, so the padding
stays zero and ``valid_hw`` keeps meaning "the top-left ``h x w`` block".
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:  # MONAI is imported on first use: it takes seconds and only augmentation needs it
    from monai.transforms import Compose

SAM_MEAN = (123.675, 116.28, 103.53)
SAM_STD = (58.395, 57.12, 57.375)
NORMALIZATIONS = ("minmax", "sam")


def resized_hw(h: int, w: int, size: int) -> tuple[int, int]:
    """(h, w) after resizing the longest side to ``size`` with the aspect ratio kept.

    Rounds like segment-anything's ``ResizeLongestSide.get_preprocess_shape`` (``int(x + 0.5)``).

    Arguments:
      h, w: original height and width.
      size: target length of the longest side.
    """
    scale = size / max(h, w)
    return max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5))


def preprocess_image(image: np.ndarray, size: int, normalization: str) -> tuple[torch.Tensor, tuple[int, int]]:
    """``H x W x 3`` uint8 -> normalized, resized (longest side ``size``), zero-padded ``(3, size, size)``.

    Arguments:
      image: RGB array, uint8.
      size: model input side S.
      normalization: ``minmax`` (LiteMedSAM: per image ``(x - min) / (max - min)`` to [0, 1]) or
        ``sam`` (ImageNet mean/std on the 0-255 scale, SAM ViT).
    Returns:
      The float32 tensor and the (h, w) of the valid, un-padded region.
    """
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {', '.join(NORMALIZATIONS)}, got {normalization!r}")
    h, w = resized_hw(image.shape[0], image.shape[1], size)
    x = torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1).float()[None]
    if (h, w) != tuple(image.shape[:2]):
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    x = x[0]
    if normalization == "minmax":
        lo, hi = x.min(), x.max()
        x = (x - lo) / torch.clamp(hi - lo, min=1e-8)
    else:
        x = (x - torch.tensor(SAM_MEAN).view(3, 1, 1)) / torch.tensor(SAM_STD).view(3, 1, 1)
    out = torch.zeros(3, size, size)
    out[:, :h, :w] = x
    return out, (h, w)


def preprocess_mask(mask: np.ndarray, size: int) -> torch.Tensor:
    """``H x W`` {0, 1} array -> nearest-resized, zero-padded ``(1, size, size)`` float32 tensor.

    Arguments:
      mask: binary foreground array.
      size: model input side S.
    """
    h, w = resized_hw(mask.shape[0], mask.shape[1], size)
    m = torch.from_numpy(np.array(mask, copy=True)).float()[None, None]
    if (h, w) != tuple(mask.shape[:2]):
        m = F.interpolate(m, size=(h, w), mode="nearest")
    out = torch.zeros(1, size, size)
    out[:, :h, :w] = m[0]
    return out


def mask_box(mask: torch.Tensor, valid_hw: tuple[int, int]) -> torch.Tensor:
    """Box ``x0, y0, x1, y1`` (x1, y1 exclusive) around the foreground; the valid region when empty.

    Arguments:
      mask: ``(1, S, S)`` or ``(S, S)`` mask, foreground > 0.
      valid_hw: (h, w) of the un-padded region, used when the mask is empty.
    """
    ys, xs = torch.nonzero(mask.reshape(mask.shape[-2:]) > 0, as_tuple=True)
    if len(xs) == 0:
        return torch.tensor([0.0, 0.0, float(valid_hw[1]), float(valid_hw[0])])
    return torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)


def training_augmentation(seed: int) -> Compose:
    """Light augmentation: flips (image and mask together), intensity scale/shift, small noise.

    Arguments:
      seed: seeds the random state of every random transform.
    """
    from monai.transforms import Compose, RandFlipd, RandGaussianNoised, RandScaleIntensityd, RandShiftIntensityd

    aug = Compose([
        RandFlipd(keys=("image", "mask"), prob=0.5, spatial_axis=1),
        RandFlipd(keys=("image", "mask"), prob=0.5, spatial_axis=0),
        RandScaleIntensityd(keys="image", factors=0.1, prob=0.5),
        RandShiftIntensityd(keys="image", offsets=0.05, prob=0.5),
        RandGaussianNoised(keys="image", std=0.02, prob=0.3),
    ])
    aug.set_random_state(seed=seed)
    return aug


def augment_valid_region(
    augmentation: Compose, image: torch.Tensor, mask: torch.Tensor, valid_hw: tuple[int, int],
    clamp: tuple[float, float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply ``augmentation`` to the valid ``h x w`` block only; the padding stays zero.

    Arguments:
      augmentation: from ``training_augmentation``.
      image: ``(3, S, S)`` preprocessed image.
      mask: ``(1, S, S)`` binary mask.
      valid_hw: (h, w) of the un-padded region.
      clamp: value range to clip the augmented image to (``(0, 1)`` for minmax), or None.
    Returns:
      The augmented image and mask, float32, same shapes; the mask stays binary.
    """
    h, w = int(valid_hw[0]), int(valid_hw[1])
    out = augmentation({"image": image[:, :h, :w].clone(), "mask": mask[:, :h, :w].clone()})
    x = torch.as_tensor(_plain(out["image"]), dtype=torch.float32)
    m = torch.as_tensor(_plain(out["mask"]), dtype=torch.float32)
    if clamp is not None:
        x = x.clamp(*clamp)
    new_image, new_mask = torch.zeros_like(image), torch.zeros_like(mask)
    new_image[:, :h, :w] = x
    new_mask[:, :h, :w] = (m > 0.5).float()
    return new_image, new_mask


def _plain(x: object) -> torch.Tensor:
    """A plain tensor from a MONAI output (MetaTensor, numpy or tensor)."""
    if hasattr(x, "as_tensor"):
        return x.as_tensor()
    return torch.as_tensor(x)
