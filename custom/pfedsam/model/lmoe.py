"""Localized Mixture-of-Experts (L-MoE): the site-specific part of pFedSAM, never sent."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class BottleneckExpert(nn.Module):
    """One expert: LayerNorm -> down -> GELU -> up (up zero-initialised: starts as identity residual).

    Arguments:
      dim (int): channel width of the features it adapts.
      hidden (int): bottleneck width.
    """

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.down = nn.Linear(dim, hidden)
        self.up = nn.Linear(hidden, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(F.gelu(self.down(self.norm(x))))


class LocalizedMoE(nn.Module):
    """K bottleneck experts mixed by a softmax router with top-k selection, as a residual adapter.

    Input and output are channels-last ``(B, ..., C)``. With ``routing="image"`` one gate vector
    is computed per image from the mean feature; with ``"token"`` one per token. After each
    forward, ``balance_loss`` holds the Switch-style load-balancing loss
    ``K * sum_j f_j * P_j`` (f_j: share of top-k slots routed to expert j, P_j: mean router
    probability), which is 1 for a perfectly balanced router, and ``gates`` the mixing weights.

    Arguments:
      dim (int): channel width.
      num_experts (int): K.
      top_k (int): experts used per routing decision (gates renormalised over them).
      hidden (int): expert bottleneck width.
      routing (str): ``image`` or ``token``.
    """

    def __init__(self, dim: int, num_experts: int, top_k: int, hidden: int, routing: str = "image") -> None:
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
        if routing not in ("image", "token"):
            raise ValueError(f"routing must be 'image' or 'token', got {routing!r}")
        self.num_experts = num_experts
        self.top_k = top_k
        self.routing = routing
        self.router = nn.Linear(dim, num_experts)
        nn.init.normal_(self.router.weight, std=0.01)
        nn.init.zeros_(self.router.bias)
        self.experts = nn.ModuleList(BottleneckExpert(dim, hidden) for _ in range(num_experts))
        self.balance_loss = torch.zeros(())
        self.gates = torch.zeros(0)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Router probabilities and sparse top-k gates, shape ``(B, K)`` or ``(B, ..., K)``."""
        flat = x.flatten(1, -2)  # (B, T, C)
        logits = self.router(flat.mean(1) if self.routing == "image" else flat)
        probs = logits.float().softmax(-1)
        top_p, top_i = probs.topk(self.top_k, dim=-1)
        gates = torch.zeros_like(probs).scatter(-1, top_i, top_p / top_p.sum(-1, keepdim=True))
        return probs, gates

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs, gates = self.route(x)
        flat_probs = probs.reshape(-1, self.num_experts)
        chosen = (gates.reshape(-1, self.num_experts) > 0).float()
        self.balance_loss = self.num_experts * (chosen.mean(0) / self.top_k * flat_probs.mean(0)).sum()
        self.gates = gates.detach()
        return x + self.mixture(x.flatten(1, -2), gates.to(x.dtype)).reshape(x.shape)

    def mixture(self, flat: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """``sum_j gate_j * expert_j(flat)`` for tokens ``(B, T, C)``, all experts in two matmuls.

        Same arithmetic as calling each expert (summation order aside), but the token tensor is
        read a few times instead of a few times per expert: the LayerNorm statistics are shared,
        each expert's LayerNorm affine is folded into its down projection, the experts' hidden
        units are concatenated, and the gates scale the hidden units before one up projection.
        The CPU speed-up of a local training step is in docs/results.md.
        Unchosen experts get gate 0, so their parameters get zero gradients (not None), as before.

        Arguments:
          flat: tokens ``(B, T, C)``.
          gates: ``(B, K)`` (image routing) or ``(B, T, K)`` (token routing).
        """
        experts = list(self.experts)
        norm = experts[0].norm
        hidden = experts[0].down.out_features
        w_down = torch.cat([e.down.weight * e.norm.weight for e in experts])  # (K*h, C)
        b_down = torch.cat([e.down.weight @ e.norm.bias + e.down.bias for e in experts])
        w_up = torch.cat([e.up.weight for e in experts], dim=1)  # (C, K*h)
        b_up = torch.stack([e.up.bias for e in experts])  # (K, C)
        h = F.gelu(F.linear(F.layer_norm(flat, norm.normalized_shape, eps=norm.eps), w_down, b_down))
        g = gates if gates.dim() == 3 else gates[:, None, :]  # (B, T or 1, K)
        # (not repeat_interleave: the legacy ONNX exporter emits a graph onnxruntime rejects)
        h = (h.unflatten(-1, (len(experts), hidden)) * g[..., None]).flatten(-2)
        return F.linear(h, w_up) + g @ b_up
