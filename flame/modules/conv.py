"""Short causal depthwise convolution (the conv in DeltaNet, Gated DeltaNet, Mamba2)."""

import math

import torch
from torch import nn

from flame.kernels.conv import ACTIVATIONS, causal_conv1d, causal_conv1d_step


class ShortConvolution(nn.Module):
    """Causal depthwise conv over [B, T, C] (or [1, L, C] with cu_seqlens of packed documents).

    forward(x, cu_seqlens=None, cache=None, output_final_state=False) -> (y, cache), where cache
    is the last kernel_size-1 inputs of each sequence, [N, C, kernel_size-1] (oldest first);
    step(x [N, C], cache) -> (y [N, C], cache) decodes one token.
    The weight is [C, 1, kernel_size] like nn.Conv1d's depthwise weight.
    """

    def __init__(self, channels: int, kernel_size: int = 4, activation: str | None = "silu", bias: bool = False):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation={activation!r} is not one of {ACTIVATIONS}")
        if channels <= 0 or kernel_size < 2:
            raise ValueError(f"ShortConvolution needs channels > 0 and kernel_size >= 2; got {channels}, {kernel_size}")
        self.channels, self.kernel_size, self.activation = channels, kernel_size, activation
        self.weight = nn.Parameter(torch.empty(channels, 1, kernel_size))
        self.bias = nn.Parameter(torch.empty(channels)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Conv1d's default: uniform(+-1/sqrt(fan_in)), fan_in = kernel_size for depthwise
        bound = 1.0 / math.sqrt(self.kernel_size)
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor | None = None, cache: torch.Tensor | None = None,
                output_final_state: bool = False):
        return causal_conv1d(x, self.weight.squeeze(1), self.bias, self.activation, cu_seqlens, cache,
                             output_final_state)

    def step(self, x: torch.Tensor, cache: torch.Tensor | None):
        if cache is None:
            cache = x.new_zeros(x.shape[0], self.channels, self.kernel_size - 1)
        return causal_conv1d_step(x, cache, self.weight.squeeze(1), self.bias, self.activation)

    def extra_repr(self) -> str:
        return f"{self.channels}, kernel_size={self.kernel_size}, activation={self.activation}, bias={self.bias is not None}"
