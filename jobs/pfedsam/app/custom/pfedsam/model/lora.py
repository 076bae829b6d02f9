"""LoRA adapters: the global, aggregated part of the encoder / decoder update."""

from __future__ import annotations

import math

import torch
from torch import nn


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus low-rank updates on chosen output channels.

    ``y = base(x)``; for each target t: ``y[..., idx_t] += (alpha / r) * B_t(A_t(x))``.
    B is zero-initialised, so a fresh adapter leaves the base layer's output unchanged.

    Arguments:
      base (nn.Linear): the layer to adapt (kept, frozen by the registry).
      rank (int): r.
      alpha (float): scaling numerator.
      targets (dict): target name -> output channel indices (None = all channels). SAM's ViT
        ``qkv`` uses ``{"q": [0:d], "v": [2d:3d]}``; TinyViT interleaves q/k/v per head.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, targets: dict[str, list[int] | None]) -> None:
        super().__init__()
        self.base = base
        self.rank = rank
        self.scale = alpha / rank
        self.target_names = list(targets)
        for name, index in targets.items():
            out = base.out_features if index is None else len(index)
            a = nn.Parameter(torch.empty(rank, base.in_features))
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            self.register_parameter(f"lora_{name}_A", a)
            self.register_parameter(f"lora_{name}_B", nn.Parameter(torch.zeros(out, rank)))
            if index is not None:
                self.register_buffer(f"index_{name}", torch.as_tensor(index, dtype=torch.long), persistent=False)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        for name in self.target_names:
            a = getattr(self, f"lora_{name}_A")
            b = getattr(self, f"lora_{name}_B")
            delta = (x @ a.t()) @ b.t() * self.scale
            index = getattr(self, f"index_{name}", None)
            y = y + delta if index is None else y.index_add(-1, index, delta)
        return y


def qkv_indices_sam(qkv: nn.Linear) -> dict[str, list[int]]:
    """q and v output channels of SAM ViT's fused qkv (layout [q | k | v])."""
    d = qkv.out_features // 3
    return {"q": list(range(0, d)), "v": list(range(2 * d, 3 * d))}


def qkv_indices_tinyvit(attn: nn.Module) -> dict[str, list[int]]:
    """q and v output channels of TinyViT's fused qkv (per head [q(kd) | k(kd) | v(d)])."""
    kd, d, heads = attn.key_dim, attn.d, attn.num_heads
    per_head = 2 * kd + d
    q = [h * per_head + i for h in range(heads) for i in range(kd)]
    v = [h * per_head + 2 * kd + i for h in range(heads) for i in range(d)]
    return {"q": q, "v": v}
