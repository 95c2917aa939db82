"""Rotary position embedding with explicit position ids (packed documents restart at 0).

Rotate-half convention (as in Llama / Hugging Face): with x = [x1, x2] split in halves of the
head dimension and angle_j = position * theta^(-2j/D),
    out = [x1 cos - x2 sin, x2 cos + x1 sin].
The inverse frequencies are computed the Hugging Face way (fp32), and the Triton kernel forms
the angles on the fly from position_ids, so no cos/sin table is stored. The backward is the
rotation by the opposite angle.
"""

import torch
import triton
import triton.language as tl

from flame.kernels.dispatch import use_triton
from flame.kernels.utils import cdiv, next_power_of_2


def rotary_inv_freq(head_dim: int, theta: float, device=None) -> torch.Tensor:
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    return 1.0 / (theta**exponent)


def rotary_ref(x, position_ids, theta=10000.0):
    """x [B, T, H, D], position_ids [B, T] -> x rotated, same dtype."""
    d = x.shape[-1]
    inv_freq = rotary_inv_freq(d, theta, x.device)
    angle = position_ids.float()[..., None] * inv_freq  # [B, T, D/2], fp32 like the kernel
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    cos = angle.cos().to(ct)[:, :, None, :]
    sin = angle.sin().to(ct)[:, :, None, :]
    x1, x2 = x.to(ct).chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


@triton.jit
def _rotary_kernel(
    x_ptr, y_ptr, pos_ptr, inv_freq_ptr,
    n_heads, half,
    stride_xt, stride_xh, stride_yt, stride_yh,
    SIGN: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # one program per token (over the flattened B*T) and block of heads; SIGN=-1 rotates back
    tok = tl.program_id(0).to(tl.int64)
    hb = tl.program_id(1)
    heads = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    cols = tl.arange(0, BLOCK_D)
    hmask = heads < n_heads
    cmask = cols < half
    mask = hmask[:, None] & cmask[None, :]
    pos = tl.load(pos_ptr + tok).to(tl.float32)
    inv_freq = tl.load(inv_freq_ptr + cols, mask=cmask, other=0.0)
    angle = pos * inv_freq
    cos = tl.cos(angle)[None, :]
    sin = tl.sin(angle)[None, :] * SIGN
    x_off = tok * stride_xt + heads[:, None] * stride_xh + cols[None, :]
    y_off = tok * stride_yt + heads[:, None] * stride_yh + cols[None, :]
    x1 = tl.load(x_ptr + x_off, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + x_off + half, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + y_off, (x1 * cos - x2 * sin).to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(y_ptr + y_off + half, (x2 * cos + x1 * sin).to(y_ptr.dtype.element_ty), mask=mask)


def _rotate(x: torch.Tensor, position_ids: torch.Tensor, inv_freq: torch.Tensor, sign: int) -> torch.Tensor:
    b, t, h, d = x.shape
    x3 = x.reshape(b * t, h, d)
    if x3.stride(-1) != 1:
        x3 = x3.contiguous()
    y = torch.empty(b * t, h, d, device=x.device, dtype=x.dtype)
    pos = position_ids.reshape(-1).contiguous()
    block_d = next_power_of_2(d // 2)
    block_h = max(1, min(next_power_of_2(h), 4096 // block_d))
    grid = (b * t, cdiv(h, block_h))
    _rotary_kernel[grid](
        x3, y, pos, inv_freq, h, d // 2, x3.stride(0), x3.stride(1), y.stride(0), y.stride(1),
        SIGN=sign, BLOCK_H=block_h, BLOCK_D=block_d, num_warps=4,
    )
    return y.view(b, t, h, d)


@torch.library.custom_op("flame::rotary", mutates_args=())
def _rotary_op(x: torch.Tensor, position_ids: torch.Tensor, theta: float, sign: int) -> torch.Tensor:
    return _rotate(x, position_ids, rotary_inv_freq(x.shape[-1], theta, x.device), sign)


@_rotary_op.register_fake
def _(x, position_ids, theta, sign):
    return torch.empty(x.shape, device=x.device, dtype=x.dtype)


def _rotary_setup(ctx, inputs, output):
    _, position_ids, theta, sign = inputs
    ctx.theta, ctx.sign = theta, sign
    ctx.save_for_backward(position_ids)


def _rotary_backward(ctx, dy):
    (position_ids,) = ctx.saved_tensors
    return _rotary_op(dy, position_ids, ctx.theta, -ctx.sign), None, None, None


_rotary_op.register_autograd(_rotary_backward, setup_context=_rotary_setup)


def apply_rotary(x: torch.Tensor, position_ids: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """Rotate x [B, T, H, D] by the angles of position_ids [B, T]."""
    if x.dim() != 4:
        raise ValueError(f"x has shape {tuple(x.shape)}; rotary embedding needs [B, T, H, D]")
    if x.shape[-1] % 2:
        raise ValueError(f"head dimension {x.shape[-1]} is odd; rotary embedding needs an even one")
    if position_ids.shape != x.shape[:2]:
        raise ValueError(
            f"position_ids has shape {tuple(position_ids.shape)}; it must be [B, T] = {tuple(x.shape[:2])}"
        )
    if position_ids.is_floating_point():
        raise ValueError(f"position_ids has dtype {position_ids.dtype}; an integer dtype is needed")
    if use_triton(x, position_ids):
        return _rotary_op(x, position_ids, float(theta), 1)
    return rotary_ref(x, position_ids, theta)
