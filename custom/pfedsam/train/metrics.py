"""Per-image Dice and HD95 (MONAI), with an explicit rule for empty masks, and their summary.

Resolution (``eval.resolution``): ``original`` (default, the test split) scores each image at
the size it is stored on disk, as published numbers do: the model's ``S x S`` logits are
cropped to the valid (un-padded) region, resized bilinearly to the original ``H x W``, then
thresholded (``sigmoid > eval.threshold``) and compared with the mask read from disk under the
site's mask convention; HD95 is in original pixels. ``model`` scores at the model's input
resolution inside the valid region (the per-round validation does this unless
``eval.resolution_val``). Padding never counts in either.

Empty masks are real (frames without a polyp):
- truth and prediction both empty: Dice 1 and HD95 0 (``empty_dice: one``) or the image is
  left out of the means (``empty_dice: skip``);
- exactly one of them empty: Dice 0 and HD95 = the diagonal of the scored region (the
  original image, or the valid region at model resolution), so a missed or hallucinated
  object is never free.

``summarize`` also reports ``dice_fg`` (mean Dice over images whose truth is non-empty),
``n_fg`` and ``empty_fp`` (share of truth-empty images with a non-empty prediction; NaN
when there are none).

Size rule (``size_rule_threshold``, ``apply_size_rule``): a model that paints a few pixels in
every frame without a polyp loses those frames entirely. The rule empties a prediction whose
area (share of the scored region) is at most a threshold chosen on a site's validation split;
it needs only each image's Dice, predicted area and whether its truth is empty, so it can be
applied after the fact, the same way to every method.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from monai.metrics import compute_dice, compute_hausdorff_distance

RESOLUTIONS = ("original", "model")


def image_metrics(
    pred: torch.Tensor, truth: torch.Tensor, valid_hw: tuple[int, int], hd95: bool = True
) -> dict[str, float]:
    """Dice (and HD95) of one binary prediction against its truth.

    Arguments:
      pred: ``(1, S, S)`` or ``(S, S)`` binary prediction (bool or {0, 1}).
      truth: same shape, binary truth.
      valid_hw: (h, w) of the un-padded region; pixels outside it are ignored.
      hd95: also compute the 95th-percentile Hausdorff distance (pixels).
    Returns ``{"dice", "hd95", "empty", "truth_empty", "pred_empty", "pred_area"}``: ``empty`` is 1.0
    when both masks are empty, ``truth_empty`` / ``pred_empty`` 1.0 when that mask is (all 0.0
    otherwise), ``pred_area`` the predicted share of the scored region.
    """
    h, w = int(valid_hw[0]), int(valid_hw[1])
    p = pred.reshape(pred.shape[-2:])[:h, :w].float()[None, None]
    t = truth.reshape(truth.shape[-2:])[:h, :w].float()[None, None]
    p_any, t_any = bool(p.any()), bool(t.any())
    out = {"empty": float(not p_any and not t_any), "truth_empty": float(not t_any), "pred_empty": float(not p_any),
           "pred_area": float(p.mean())}
    out["dice"] = float(compute_dice(p, t, include_background=True, ignore_empty=False)[0, 0])
    if hd95:
        if p_any and t_any:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out["hd95"] = float(compute_hausdorff_distance(p, t, include_background=True, percentile=95)[0, 0])
        else:
            out["hd95"] = 0.0 if not (p_any or t_any) else math.hypot(h, w)
    return out


def prediction_at_original(
    logits: torch.Tensor, valid_hw: tuple[int, int], orig_hw: tuple[int, int], threshold: float = 0.5
) -> torch.Tensor:
    """The binary prediction at the image's original resolution.

    The logits are cropped to the valid region (padding dropped), resized bilinearly
    (``align_corners=False``, as SAM's ``postprocess_masks``) to ``orig_hw``, then thresholded.

    Arguments:
      logits: ``(1, S, S)`` or ``(S, S)`` logits at model resolution, padded bottom/right.
      valid_hw: (h, w) of the un-padded region.
      orig_hw: (H, W) of the image as stored on disk.
      threshold: probability threshold (``sigmoid(logit) > threshold``).
    Returns a ``(H, W)`` bool tensor on the logits' device.
    """
    h, w = int(valid_hw[0]), int(valid_hw[1])
    size = (int(orig_hw[0]), int(orig_hw[1]))
    x = logits.reshape(logits.shape[-2:])[:h, :w].float()[None, None]
    if (h, w) != size:
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    return torch.sigmoid(x[0, 0]) > threshold


def original_image_metrics(
    logits: torch.Tensor, valid_hw: tuple[int, int], truth: torch.Tensor | np.ndarray, threshold: float = 0.5,
    hd95: bool = True,
) -> dict[str, float]:
    """``image_metrics`` at the original resolution: the prediction resized back to the truth's ``H x W``.

    Arguments:
      logits: ``(1, S, S)`` or ``(S, S)`` model logits (padded).
      valid_hw: (h, w) of the un-padded region of the logits.
      truth: ``(H, W)`` binary truth as stored on disk (bool or {0, 1}).
      threshold: probability threshold.
      hd95: also compute HD95 (original pixels; the image diagonal when exactly one mask is empty).
    """
    t = torch.as_tensor(truth)
    hw = (int(t.shape[-2]), int(t.shape[-1]))
    pred = prediction_at_original(logits, valid_hw, hw, threshold).cpu()
    return image_metrics(pred, t.reshape(hw), hw, hd95)


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else float("nan")


def summarize(rows: list[dict[str, float]], empty_dice: str = "one") -> dict[str, float]:
    """Mean Dice / HD95 over images, and the empty-frame statistics.

    Arguments:
      rows: ``image_metrics`` results, one per image.
      empty_dice: ``one`` keeps both-empty images (Dice 1, HD95 0), ``skip`` leaves them out of
        ``n``, ``dice`` and ``hd95``.
    Returns ``n`` (images in the means), ``n_empty`` (both empty), ``dice``, ``hd95``, ``n_fg``
    (images whose truth is non-empty), ``dice_fg`` (their mean Dice) and ``empty_fp`` (share of
    truth-empty images with a non-empty prediction; NaN when there are none). Missing values are NaN.
    """
    kept = [r for r in rows if not (empty_dice == "skip" and r["empty"])]
    out: dict[str, float] = {"n": float(len(kept)), "n_empty": float(sum(r["empty"] for r in rows))}
    for key in ("dice", "hd95"):
        out[key] = _mean([r[key] for r in kept if key in r])
    fg = [r for r in rows if not r["truth_empty"]]
    out["n_fg"] = float(len(fg))
    out["dice_fg"] = _mean([r["dice"] for r in fg])
    out["empty_fp"] = _mean([1.0 - r["pred_empty"] for r in rows if r["truth_empty"]])
    return out


def size_rule_empties(pred_area: float, min_area: float) -> bool:
    """Whether the size rule empties a prediction of this area (the one place the rule compares)."""
    return pred_area <= min_area


def _dice_under_rule(dice: float, pred_area: float, truth_empty: bool, min_area: float) -> float:
    # an emptied prediction scores 1 on a frame without a polyp and 0 on one with a polyp
    return (1.0 if truth_empty else 0.0) if size_rule_empties(pred_area, min_area) else float(dice)


def apply_size_rule(dice: list[float], pred_area: list[float], truth_empty: list[bool], min_area: float) -> list[float]:
    """Per-image Dice after emptying every prediction whose area is at most ``min_area``.

    Arguments:
      dice: per-image Dice without the rule.
      pred_area: per-image predicted share of the scored region (``image_metrics``'s ``pred_area``).
      truth_empty: per image, whether its truth mask is empty.
      min_area: the threshold; 0 changes nothing (an empty prediction stays empty).
    """
    if not len(dice) == len(pred_area) == len(truth_empty):
        raise ValueError(f"size rule: {len(dice)} Dice, {len(pred_area)} areas and {len(truth_empty)} "
                         "truth flags; they must be per image, the same images")
    return [_dice_under_rule(d, a, t, min_area) for d, a, t in zip(dice, pred_area, truth_empty, strict=True)]


def size_rule_threshold(dice: list[float], pred_area: list[float], truth_empty: list[bool]) -> float:
    """The area threshold with the best mean Dice on these (validation) images; ties go to the
    smallest, so a split without empty frames or small false positives keeps threshold 0.

    Candidates are 0 and every predicted area seen, so the choice is exact, not a grid.
    Arguments: as ``apply_size_rule``, for the split the threshold is chosen on.
    """
    best, best_score = 0.0, float(np.mean(apply_size_rule(dice, pred_area, truth_empty, 0.0))) if dice else 0.0
    for a in sorted(set(float(x) for x in pred_area)):
        score = float(np.mean(apply_size_rule(dice, pred_area, truth_empty, a)))
        if score > best_score + 1e-12:
            best, best_score = a, score
    return best
