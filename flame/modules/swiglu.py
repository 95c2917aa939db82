"""SwiGLU feed-forward: down(silu(gate(x)) * up(x)), with the activation product fused."""

import torch
import triton
import triton.language as tl
from torch import nn

from flame.kernels.dispatch import use_triton
from flame.kernels.utils import cdiv


def swiglu_ref(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return nn.functional.silu(a) * b


@triton.jit
def _swiglu_fwd_kernel(a_ptr, b_ptr, y_ptr, n, BLOCK: tl.constexpr):
    off = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = off < n
    a = tl.load(a_ptr + off, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + off, mask=mask, other=0.0).to(tl.float32)
    y = a / (1.0 + tl.exp(-a)) * b
    tl.store(y_ptr + off, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(a_ptr, b_ptr, dy_ptr, da_ptr, db_ptr, n, BLOCK: tl.constexpr):
    off = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = off < n
    a = tl.load(a_ptr + off, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + off, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + off, mask=mask, other=0.0).to(tl.float32)
    s = 1.0 / (1.0 + tl.exp(-a))
    tl.store(da_ptr + off, (dy * b * s * (1.0 + a * (1.0 - s))).to(da_ptr.dtype.element_ty), mask=mask)
    tl.store(db_ptr + off, (dy * a * s).to(db_ptr.dtype.element_ty), mask=mask)


_BLOCK = 1024


@torch.library.custom_op("flame::swiglu", mutates_args=())
def _swiglu_op(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a.contiguous(), b.contiguous()
    y = torch.empty_like(a)
    _swiglu_fwd_kernel[(cdiv(a.numel(), _BLOCK),)](a, b, y, a.numel(), BLOCK=_BLOCK, num_warps=4)
    return y


@_swiglu_op.register_fake
def _(a, b):
    return torch.empty_like(a)


@torch.library.custom_op("flame::swiglu_bwd", mutates_args=())
def _swiglu_bwd_op(a: torch.Tensor, b: torch.Tensor, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    a, b, dy = a.contiguous(), b.contiguous(), dy.contiguous()
    da, db = torch.empty_like(a), torch.empty_like(b)
    _swiglu_bwd_kernel[(cdiv(a.numel(), _BLOCK),)](a, b, dy, da, db, a.numel(), BLOCK=_BLOCK, num_warps=4)
    return da, db


@_swiglu_bwd_op.register_fake
def _(a, b, dy):
    return torch.empty_like(a), torch.empty_like(b)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, dy):
    a, b = ctx.saved_tensors
    return _swiglu_bwd_op(a, b, dy)


_swiglu_op.register_autograd(_backward, setup_context=_setup)


def swiglu(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """silu(a) * b."""
    if a.shape != b.shape or a.dtype != b.dtype:
        raise ValueError(
            f"swiglu needs a and b of one shape and dtype; got {tuple(a.shape)} {a.dtype} and "
            f"{tuple(b.shape)} {b.dtype}"
        )
    if use_triton(a, b):
        return _swiglu_op(a, b)
    return swiglu_ref(a, b)


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        if dim <= 0 or hidden_dim <= 0:
            raise ValueError(f"SwiGLU needs positive dim and hidden_dim; got {dim}, {hidden_dim}")
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))
