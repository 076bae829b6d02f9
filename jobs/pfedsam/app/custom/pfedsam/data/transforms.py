"""Preprocessing (SAM convention) and light training augmentation."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms import Compose, RandFlipd, RandGaussianNoised, RandScaleIntensityd, RandShiftIntensityd

SAM_MEAN = (123.675, 116.28, 103.53)
SAM_STD = (58.395, 57.12, 57.375)
NORMALIZATIONS = ("minmax", "sam")


def resized_hw(h: int, w: int, size: int) -> tuple[int, int]:
    """(h, w) after resizing the longest side to ``size`` (aspect ratio kept)."""
    scale = size / max(h, w)
    return max(1, int(round(h * scale))), max(1, int(round(w * scale)))


def preprocess_image(image: np.ndarray, size: int, normalization: str) -> tuple[torch.Tensor, tuple[int, int]]:
    """HxWx3 uint8 -> normalized, resized (longest side ``size``), zero-padded ``(3, size, size)``.

    Arguments:
      image: RGB array, uint8.
      size: model input side S.
      normalization: ``minmax`` (per image to [0, 1], LiteMedSAM) or ``sam`` (ImageNet mean/std
        on the 0-255 scale, SAM ViT).
    Returns the tensor and the (h, w) of the valid, un-padded region.
    """
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    h, w = resized_hw(image.shape[0], image.shape[1], size)
    x = torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1).float()[None]
    x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=True)[0]
    if normalization == "minmax":
        lo, hi = x.min(), x.max()
        x = (x - lo) / torch.clamp(hi - lo, min=1e-8)
    else:
        x = (x - torch.tensor(SAM_MEAN).view(3, 1, 1)) / torch.tensor(SAM_STD).view(3, 1, 1)
    out = torch.zeros(3, size, size)
    out[:, :h, :w] = x
    return out, (h, w)


def preprocess_mask(mask: np.ndarray, size: int) -> torch.Tensor:
    """HxW {0,1} array -> nearest-resized, zero-padded ``(1, size, size)`` float tensor."""
    h, w = resized_hw(mask.shape[0], mask.shape[1], size)
    m = torch.from_numpy(np.array(mask, copy=True)).float()[None, None]
    m = F.interpolate(m, size=(h, w), mode="nearest")[0]
    out = torch.zeros(1, size, size)
    out[:, :h, :w] = m
    return out


def mask_box(mask: torch.Tensor, valid_hw: tuple[int, int]) -> torch.Tensor:
    """Box x0, y0, x1, y1 around the foreground; the whole valid region when the mask is empty."""
    ys, xs = torch.nonzero(mask.reshape(mask.shape[-2:]) > 0, as_tuple=True)
    if len(xs) == 0:
        return torch.tensor([0.0, 0.0, float(valid_hw[1]), float(valid_hw[0])])
    return torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)


def training_augmentation(seed: int) -> Compose:
    """Light augmentation: flips (image and mask together), intensity scale/shift, small noise."""
    aug = Compose([
        RandFlipd(keys=("image", "mask"), prob=0.5, spatial_axis=1),
        RandFlipd(keys=("image", "mask"), prob=0.5, spatial_axis=0),
        RandScaleIntensityd(keys="image", factors=0.1, prob=0.5),
        RandShiftIntensityd(keys="image", offsets=0.05, prob=0.5),
        RandGaussianNoised(keys="image", std=0.02, prob=0.3),
    ])
    aug.set_random_state(seed=seed)
    return aug
