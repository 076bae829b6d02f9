"""Losses of the two phases: segmentation (Dice + CE) and teacher-student distillation."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss


def segmentation_loss(batch_dice: bool = False) -> DiceCELoss:
    """Dice + binary cross-entropy on mask logits ``(B, 1, S, S)`` against {0, 1} targets.

    Arguments:
      batch_dice: one Dice over the batch's pixels instead of the mean of each image's. Why it
        matters: an image's own Dice on a frame without a polyp is ``1 - 1e-5 / (predicted area
        + 1e-5)``, about 1 whatever is predicted, so such a frame gets no Dice gradient and only
        cross-entropy teaches it to stay empty; in a batch Dice its predicted pixels enlarge the
        batch's denominator like any other false positive.
    """
    return DiceCELoss(sigmoid=True, squared_pred=False, reduction="mean", batch=batch_dice)


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
                      image_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Per-pixel KL(teacher_T || student_T) of Bernoulli masks, times T^2, averaged over pixels.

    Arguments:
      student_logits: mask logits ``(B, ...)`` of the personalized model (gradients flow here).
      teacher_logits: mask logits of the global model (treated as constants).
      temperature: T; both logits are divided by T before the sigmoid.
      image_weight: optional ``(B,)`` weight of each image's mean KL (None: every image 1).
    Returns 0 for identical logits and a positive value otherwise.
    """
    t = teacher_logits.detach().float() / temperature
    s = student_logits.float() / temperature
    p_t = torch.sigmoid(t)
    # KL for Bernoulli distributions, in log-sigmoid form for numerical stability.
    kl = p_t * (F.logsigmoid(t) - F.logsigmoid(s)) + (1 - p_t) * (F.logsigmoid(-t) - F.logsigmoid(-s))
    if image_weight is None:
        return kl.mean() * temperature**2
    per_image = kl.flatten(1).mean(1)
    return (per_image * image_weight.to(per_image)).mean() * temperature**2


def teacher_dice(teacher_logits: torch.Tensor, masks: torch.Tensor, threshold: float) -> torch.Tensor:
    """``(B,)`` Dice of each image's thresholded teacher mask against the truth (both empty: 1).

    The gate of ``train.kd_gate: teacher_dice``: an image is distilled as much as the teacher
    got it right, so a teacher that sees a polyp in an empty frame teaches nothing there.
    """
    pred = (torch.sigmoid(teacher_logits.detach().float()) > threshold).flatten(1).float()
    truth = (masks > 0.5).flatten(1).float()
    inter, total = (pred * truth).sum(1), pred.sum(1) + truth.sum(1)
    return torch.where(total > 0, 2 * inter / total.clamp_min(1), torch.ones_like(total))


def proximal_term(params: dict[str, torch.Tensor], anchor: dict[str, torch.Tensor]) -> torch.Tensor:
    """FedProx term 0.5 * ||w - w_anchor||^2 summed over the given parameters."""
    total = torch.zeros((), device=next(iter(params.values())).device) if params else torch.zeros(())
    for name, p in params.items():
        total = total + (p - anchor[name]).pow(2).sum()
    return 0.5 * total
