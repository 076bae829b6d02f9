"""Per-image Dice and HD95 (MONAI), with an explicit rule for empty masks.

Metrics are computed at the model's input resolution (longest side S) inside the valid,
un-padded region of each image. Empty masks are real (frames without a polyp):
- truth and prediction both empty: Dice 1 and HD95 0 (``empty_dice: one``) or the image is
  left out of the means (``empty_dice: skip``);
- exactly one of them empty: Dice 0 and HD95 = the diagonal of the valid region (the
  largest possible distance), so a missed or hallucinated object is never free.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance


def image_metrics(
    pred: torch.Tensor, truth: torch.Tensor, valid_hw: tuple[int, int], hd95: bool = True
) -> dict[str, float]:
    """Dice (and HD95) of one binary prediction against its truth.

    Arguments:
      pred: ``(1, S, S)`` or ``(S, S)`` binary prediction (bool or {0, 1}).
      truth: same shape, binary truth.
      valid_hw: (h, w) of the un-padded region; pixels outside it are ignored.
      hd95: also compute the 95th-percentile Hausdorff distance (pixels).
    Returns ``{"dice", "hd95", "empty"}`` where ``empty`` is 1.0 when both masks are empty.
    """
    h, w = int(valid_hw[0]), int(valid_hw[1])
    p = pred.reshape(pred.shape[-2:])[:h, :w].float()[None, None]
    t = truth.reshape(truth.shape[-2:])[:h, :w].float()[None, None]
    p_any, t_any = bool(p.any()), bool(t.any())
    out = {"empty": float(not p_any and not t_any)}
    out["dice"] = float(compute_dice(p, t, include_background=True, ignore_empty=False)[0, 0])
    if hd95:
        if p_any and t_any:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out["hd95"] = float(compute_hausdorff_distance(p, t, include_background=True, percentile=95)[0, 0])
        else:
            out["hd95"] = 0.0 if not (p_any or t_any) else math.hypot(h, w)
    return out


def summarize(rows: list[dict[str, float]], empty_dice: str = "one") -> dict[str, float]:
    """Mean Dice / HD95 over images; ``empty_dice='skip'`` leaves both-empty images out."""
    kept = [r for r in rows if not (empty_dice == "skip" and r["empty"])]
    out: dict[str, float] = {"n": float(len(kept)), "n_empty": float(sum(r["empty"] for r in rows))}
    for key in ("dice", "hd95"):
        values = [r[key] for r in kept if key in r]
        out[key] = float(np.mean(values)) if values else float("nan")
    return out
