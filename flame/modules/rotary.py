"""Rotary position embedding driven by position_ids, so packed documents restart at 0."""

import torch
from torch import nn

from flame.kernels.rotary import apply_rotary


class RotaryEmbedding(nn.Module):
    """forward(q, k, position_ids) with q, k [B, T, H, D] and position_ids [B, T] -> (q, k) rotated.

    Holds no buffers: the frequencies are recomputed from (head_dim, theta) on each call, which
    keeps the module trivially correct after building on the meta device."""

    def __init__(self, head_dim: int, theta: float = 10000.0):
        super().__init__()
        if head_dim <= 0 or head_dim % 2:
            raise ValueError(f"head_dim={head_dim}: rotary embedding needs a positive even head_dim")
        if theta <= 0:
            raise ValueError(f"theta={theta} must be positive")
        self.head_dim, self.theta = head_dim, float(theta)

    def forward(self, q: torch.Tensor, k: torch.Tensor, position_ids: torch.Tensor):
        for name, t in (("q", q), ("k", k)):
            if t.shape[-1] != self.head_dim:
                raise ValueError(f"{name} has head dimension {t.shape[-1]}; this RotaryEmbedding has {self.head_dim}")
        return apply_rotary(q, position_ids, self.theta), apply_rotary(k, position_ids, self.theta)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, theta={self.theta}"
