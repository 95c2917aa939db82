"""SwiGLU feed-forward: down(silu(gate(x)) * up(x)), with the activation product fused."""

import torch
import triton
import triton.language as tl
from torch import nn

from flame.kernels.dispatch import use_triton
from flame.kernels.utils import cdiv
from flame.modules.concat_linear import column_shards, concat_linear


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


# --------------------------------------------------------------------- packed gate and up halves
# The MLP's gate and up projections as one matmul give one [rows, 2H] output: a = its first H
# columns, b = its last H. These kernels read the halves in place and write the gradient of
# that output as one tensor, so the matmul's backward takes it whole (no split, no add of two
# input gradients).


def swiglu_packed_ref(ab: torch.Tensor) -> torch.Tensor:
    a, b = ab.chunk(2, dim=-1)
    return swiglu_ref(a, b)


@triton.jit
def _packed_tile(ab_ptr, n_rows, H, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """The program's [ROWS, BLOCK] tile of both halves, fp32, with its mask and the offsets of
    its a half in ab and of its outputs in a [rows, H] tensor."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < H)
    a_off = rows[:, None].to(tl.int64) * (2 * H) + cols[None, :]
    a = tl.load(ab_ptr + a_off, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(ab_ptr + a_off + H, mask=mask, other=0.0).to(tl.float32)
    return a, b, mask, a_off, rows[:, None].to(tl.int64) * H + cols[None, :]


@triton.jit
def _swiglu_packed_fwd_kernel(ab_ptr, y_ptr, n_rows, H, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    a, b, mask, _, y_off = _packed_tile(ab_ptr, n_rows, H, ROWS, BLOCK)
    y = a / (1.0 + tl.exp(-a)) * b
    tl.store(y_ptr + y_off, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_packed_bwd_kernel(ab_ptr, dy_ptr, dab_ptr, n_rows, H, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    a, b, mask, a_off, y_off = _packed_tile(ab_ptr, n_rows, H, ROWS, BLOCK)
    dy = tl.load(dy_ptr + y_off, mask=mask, other=0.0).to(tl.float32)
    s = 1.0 / (1.0 + tl.exp(-a))
    tl.store(dab_ptr + a_off, (dy * b * s * (1.0 + a * (1.0 - s))).to(dab_ptr.dtype.element_ty), mask=mask)
    tl.store(dab_ptr + a_off + H, (dy * a * s).to(dab_ptr.dtype.element_ty), mask=mask)


_PACKED_ROWS, _PACKED_BLOCK = 4, 512  # 2048 outputs per program, as the flat kernels' 1024 x 2 inputs


def _packed_grid(n_rows: int, H: int) -> tuple[int, int]:
    return cdiv(n_rows, _PACKED_ROWS), cdiv(H, _PACKED_BLOCK)


@torch.library.custom_op("flame::swiglu_packed", mutates_args=())
def _swiglu_packed_op(ab: torch.Tensor) -> torch.Tensor:
    ab = ab.contiguous()
    H = ab.shape[-1] // 2
    y = ab.new_empty(*ab.shape[:-1], H)
    n_rows = ab.numel() // (2 * H) if H else 0
    if n_rows:
        _swiglu_packed_fwd_kernel[_packed_grid(n_rows, H)](ab, y, n_rows, H, ROWS=_PACKED_ROWS,
                                                           BLOCK=_PACKED_BLOCK, num_warps=4)
    return y


@_swiglu_packed_op.register_fake
def _(ab):
    return ab.new_empty(*ab.shape[:-1], ab.shape[-1] // 2)


@torch.library.custom_op("flame::swiglu_packed_bwd", mutates_args=())
def _swiglu_packed_bwd_op(ab: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    ab, dy = ab.contiguous(), dy.contiguous()
    H = ab.shape[-1] // 2
    dab = torch.empty_like(ab)
    n_rows = ab.numel() // (2 * H) if H else 0
    if n_rows:
        _swiglu_packed_bwd_kernel[_packed_grid(n_rows, H)](ab, dy, dab, n_rows, H, ROWS=_PACKED_ROWS,
                                                           BLOCK=_PACKED_BLOCK, num_warps=4)
    return dab


@_swiglu_packed_bwd_op.register_fake
def _(ab, dy):
    return torch.empty_like(ab)


def _packed_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _packed_backward(ctx, dy):
    (ab,) = ctx.saved_tensors
    return _swiglu_packed_bwd_op(ab, dy)


_swiglu_packed_op.register_autograd(_packed_backward, setup_context=_packed_setup)


def swiglu_packed(ab: torch.Tensor) -> torch.Tensor:
    """silu(a) * b for ab = [a, b] along the last dim (each half H wide): [..., 2H] -> [..., H]."""
    if ab.shape[-1] % 2:
        raise ValueError(f"swiglu_packed needs an even last dim (the gate and up halves); got {tuple(ab.shape)}")
    if use_triton(ab):
        return _swiglu_packed_op(ab)
    return swiglu_packed_ref(ab)


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        if dim <= 0 or hidden_dim <= 0:
            raise ValueError(f"SwiGLU needs positive dim and hidden_dim; got {dim}, {hidden_dim}")
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Gate and up as one matmul (under tensor parallelism on this rank's rows of both): one
        # launch, a wider and more efficient matmul, and in the backward one input-gradient
        # matmul instead of two and their sum.
        shards = column_shards(x, [self.gate_proj.weight, self.up_proj.weight])
        if shards is not None:
            return self.down_proj(swiglu_packed(concat_linear(*shards)))
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))
