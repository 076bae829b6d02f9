"""Losses of the two phases: segmentation (Dice + CE) and teacher-student distillation."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss


def segmentation_loss() -> DiceCELoss:
    """Dice + binary cross-entropy on mask logits ``(B, 1, S, S)`` against {0, 1} targets."""
    return DiceCELoss(sigmoid=True, squared_pred=False, reduction="mean")


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-pixel KL(teacher_T || student_T) of Bernoulli masks, times T^2, averaged over pixels.

    Arguments:
      student_logits: mask logits of the personalized model (gradients flow here).
      teacher_logits: mask logits of the global model (treated as constants).
      temperature: T; both logits are divided by T before the sigmoid.
    Returns 0 for identical logits and a positive value otherwise.
    """
    t = teacher_logits.detach().float() / temperature
    s = student_logits.float() / temperature
    p_t = torch.sigmoid(t)
    # KL for Bernoulli distributions, in log-sigmoid form for numerical stability.
    kl = p_t * (F.logsigmoid(t) - F.logsigmoid(s)) + (1 - p_t) * (F.logsigmoid(-t) - F.logsigmoid(-s))
    return kl.mean() * temperature**2


def proximal_term(params: dict[str, torch.Tensor], anchor: dict[str, torch.Tensor]) -> torch.Tensor:
    """FedProx term 0.5 * ||w - w_anchor||^2 summed over the given parameters."""
    total = torch.zeros((), device=next(iter(params.values())).device) if params else torch.zeros(())
    for name, p in params.items():
        total = total + (p - anchor[name]).pow(2).sum()
    return 0.5 * total
