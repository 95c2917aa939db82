"""RMSNorm (with an optional fused residual add), gated RMSNorm, and Mamba2's output norm (gate
before the norm, with the D skip term)."""

import torch
from torch import nn

from flame.kernels.norm import ACTIVATIONS, gated_rms_norm, rms_norm
from flame.kernels.skip_gated_norm import skip_gated_rms_norm


class RMSNorm(nn.Module):
    """forward(x) -> y; forward(x, residual) -> (y, x + residual), y = rmsnorm(x + residual)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        if dim <= 0 or eps < 0:
            raise ValueError(f"RMSNorm needs dim > 0 and eps >= 0; got dim={dim}, eps={eps}")
        self.dim, self.eps = dim, eps
        self.weight = nn.Parameter(torch.empty(dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        y, summed = rms_norm(x, self.weight, residual, self.eps)
        return y if residual is None else (y, summed)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}"


class GatedRMSNorm(nn.Module):
    """forward(x, gate) = rmsnorm(x) * weight * act(gate), act = silu or sigmoid."""

    def __init__(self, dim: int, eps: float = 1e-6, activation: str = "silu"):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation={activation!r} is not one of {ACTIVATIONS}")
        if dim <= 0 or eps < 0:
            raise ValueError(f"GatedRMSNorm needs dim > 0 and eps >= 0; got dim={dim}, eps={eps}")
        self.dim, self.eps, self.activation = dim, eps, activation
        self.weight = nn.Parameter(torch.empty(dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return gated_rms_norm(x, gate, self.weight, self.eps, self.activation)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}, activation={self.activation}"


class SkipGatedRMSNorm(RMSNorm):
    """Mamba2's output norm: forward(y, x, D, z) = rmsnorm((y + D[head] * x) * silu(z)) * weight,
    the gate applied before the norm and the skip term D x (one D per head) added first, fused
    so that neither intermediate is written. One weight over all dim channels."""

    def forward(self, y: torch.Tensor, x: torch.Tensor, D: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return skip_gated_rms_norm(y, x, D, z, self.weight, self.eps)
