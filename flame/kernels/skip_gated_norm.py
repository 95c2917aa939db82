"""Mamba2's output norm with its skip term: the gate before the norm, D x added first.

    s   = y + D[head] * x              D: one scalar per head of P = C / len(D) channels
    out = rmsnorm(s * silu(z)) * weight

Written as elementwise ops, s and s * silu(z) are each a round trip through memory and
s * silu(z) is kept for the backward; here the forward reads y, x and z once and writes only the
output (and one fp32 statistic per row), and the backward recomputes s and the gate from the
same three inputs. x and z may be channel slices of wider tensors (the conv output and the
input projection): rows are read at their own stride, not copied.

The backward returns dy and dz; dx = D dy is left to the caller's graph (autograd below), where
torch.compile fuses it into the kernel that adds it to x's other gradient instead of writing it.
A pure-torch reference (`skip_gated_rms_norm_ref`) is the CPU path and the test oracle.
"""

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from flame.kernels.dispatch import use_triton
from flame.kernels.norm import (_act_and_grad, _block_and_warps, _bwd_tile, _check_norm_inputs, _compute_dtype,
                                _num_programs)
from flame.kernels.utils import ROW_STRIDED_OP_TAGS, cdiv


def _check_inputs(y, x, D, z, weight) -> None:
    _check_norm_inputs(y, weight, inp_name="y", x=x, z=z)
    if D.dim() != 1 or D.numel() == 0 or y.shape[-1] % D.numel():
        raise ValueError(f"D has shape {tuple(D.shape)}; it must be 1-D with one entry per head, a number of "
                         f"heads that divides y's last dimension {y.shape[-1]}")


def gated_skip_sum(y, x, D, z):
    """u = (y + D[head] x) silu(z) in the compute dtype (float64 for float64 input, else
    float32): the quantity the norm normalises, over the heads of D (one scalar each)."""
    ct = _compute_dtype(y.dtype)
    heads = D.numel()
    shape = (*y.shape[:-1], heads, y.shape[-1] // heads)
    s = (y.to(ct).reshape(shape) + x.to(ct).reshape(shape) * D.to(ct)[:, None]).reshape(y.shape)
    return s * F.silu(z.to(ct))


def skip_gated_rms_norm_ref(y, x, D, z, weight, eps=1e-6):
    u = gated_skip_sum(y, x, D, z)
    out = u * torch.rsqrt(u.pow(2).mean(-1, keepdim=True) + eps) * weight.to(u.dtype)
    return out.to(y.dtype)


# ----------------------------------------------------------------------------- Triton kernels


@triton.jit
def _skip_gated_fwd_kernel(
    y_ptr, x_ptr, z_ptr, d_ptr, w_ptr, out_ptr, rstd_ptr,
    n_cols, y_stride, x_stride, z_stride, eps,
    HEAD: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    y = tl.load(y_ptr + row * y_stride + cols, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + row * z_stride + cols, mask=mask, other=0.0).to(tl.float32)
    d = tl.load(d_ptr + cols // HEAD, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    a, _ = _act_and_grad(z, True)
    u = (y + d * x) * a
    rstd = 1.0 / tl.sqrt(tl.sum(u * u, axis=0) / n_cols + eps)
    tl.store(rstd_ptr + row, rstd)
    tl.store(out_ptr + row * n_cols + cols, (u * rstd * w).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_tile_loads(y_ptr, x_ptr, z_ptr, dout_ptr, rstd_ptr, first, cols, cmask, n_rows, n_cols,
                    y_stride, x_stride, z_stride, BLOCK_M: tl.constexpr):
    """The tile of BLOCK_M rows from row `first`: its mask, 64-bit row indices, y, x, z and the
    output gradient as stored, and the rows' rstd."""
    rows = first + tl.arange(0, BLOCK_M)
    mask = (rows < n_rows)[:, None] & cmask[None, :]
    r64 = rows.to(tl.int64)[:, None]
    y = tl.load(y_ptr + r64 * y_stride + cols[None, :], mask=mask, other=0.0)
    x = tl.load(x_ptr + r64 * x_stride + cols[None, :], mask=mask, other=0.0)
    z = tl.load(z_ptr + r64 * z_stride + cols[None, :], mask=mask, other=0.0)
    g = tl.load(dout_ptr + r64 * n_cols + cols[None, :], mask=mask, other=0.0)
    rstd = tl.load(rstd_ptr + rows, mask=rows < n_rows, other=0.0)
    return mask, r64, y, x, z, g, rstd


@triton.jit
def _skip_gated_bwd_kernel(
    y_ptr, x_ptr, z_ptr, d_ptr, w_ptr, rstd_ptr, dout_ptr, dy_ptr, dz_ptr, dd_ptr, dw_ptr,
    n_rows, n_cols, y_stride, x_stride, z_stride,
    HEAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK: tl.constexpr,
):
    # Persistent like the RMSNorm backward (flame/kernels/norm.py): program p takes every P-th
    # tile of BLOCK_M rows, loads the next tile before reducing this one, and keeps its partial
    # weight and D gradients (per channel) in registers.
    pid = tl.program_id(0)
    step = tl.num_programs(0) * BLOCK_M
    cols = tl.arange(0, BLOCK)
    cmask = cols < n_cols
    w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    d = tl.load(d_ptr + cols // HEAD, mask=cmask, other=0.0).to(tl.float32)[None, :]
    dw = tl.zeros([BLOCK_M, BLOCK], dtype=tl.float32)
    dd = tl.zeros([BLOCK_M, BLOCK], dtype=tl.float32)

    mask, r64, y_raw, x_raw, z_raw, g_raw, rstd = _bwd_tile_loads(
        y_ptr, x_ptr, z_ptr, dout_ptr, rstd_ptr, pid * BLOCK_M, cols, cmask, n_rows, n_cols,
        y_stride, x_stride, z_stride, BLOCK_M)
    for first_next in range(pid * BLOCK_M + step, n_rows + step, step):
        mask_next, n64, y_next, x_next, z_next, g_next, rstd_next = _bwd_tile_loads(
            y_ptr, x_ptr, z_ptr, dout_ptr, rstd_ptr, first_next, cols, cmask, n_rows, n_cols,
            y_stride, x_stride, z_stride, BLOCK_M)

        x = x_raw.to(tl.float32)
        s = y_raw.to(tl.float32) + d * x
        a, da = _act_and_grad(z_raw.to(tl.float32), True)
        uhat = s * a * rstd[:, None]
        dout = g_raw.to(tl.float32)
        dw += dout * uhat
        duhat = dout * w
        du = rstd[:, None] * (duhat - uhat * (tl.sum(duhat * uhat, axis=1) / n_cols)[:, None])
        ds = du * a
        dd += ds * x
        off = r64 * n_cols + cols[None, :]
        tl.store(dy_ptr + off, ds.to(dy_ptr.dtype.element_ty), mask=mask)
        tl.store(dz_ptr + off, (du * s * da).to(dz_ptr.dtype.element_ty), mask=mask)

        mask, r64, rstd = mask_next, n64, rstd_next
        y_raw, x_raw, z_raw, g_raw = y_next, x_next, z_next, g_next
    tl.store(dw_ptr + pid * n_cols + cols, tl.sum(dw, axis=0), mask=cmask)
    tl.store(dd_ptr + pid * n_cols + cols, tl.sum(dd, axis=0), mask=cmask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t as [rows, C] with unit channel stride, in place when it already has one."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _fwd_impl(y, x, z, D, weight, eps):
    n_cols = y.shape[-1]
    y2, x2, z2 = _rows(y), _rows(x), _rows(z)
    n_rows = y2.shape[0]
    out = torch.empty(y.shape, device=y.device, dtype=y.dtype)
    rstd = torch.empty(n_rows, device=y.device, dtype=torch.float32)
    block, warps = _block_and_warps(n_cols)
    if n_rows:
        _skip_gated_fwd_kernel[(n_rows,)](
            y2, x2, z2, D, weight, out, rstd, n_cols, y2.stride(0), x2.stride(0), z2.stride(0), eps,
            HEAD=n_cols // D.numel(), BLOCK=block, num_warps=warps,
        )
    return out, rstd


def _bwd_impl(dout, y, x, z, D, weight, rstd):
    n_cols = y.shape[-1]
    y2, x2, z2 = _rows(y), _rows(x), _rows(z)
    dout2 = dout.reshape(-1, n_cols).contiguous()
    n_rows = y2.shape[0]
    dy = torch.empty(y.shape, device=y.device, dtype=y.dtype)
    dz = torch.empty(z.shape, device=z.device, dtype=z.dtype)
    rows_per_tile, block, warps = _bwd_tile(n_cols)
    constexprs = dict(HEAD=n_cols // D.numel(), BLOCK_M=rows_per_tile, BLOCK=block)

    def args(dd_partial, dw_partial):
        return (y2, x2, z2, D, weight, rstd, dout2, dy, dz, dd_partial, dw_partial,
                n_rows, n_cols, y2.stride(0), x2.stride(0), z2.stride(0))

    programs = _num_programs(_skip_gated_bwd_kernel, args(rstd, rstd), constexprs, warps,
                             cdiv(n_rows, rows_per_tile))
    partial = torch.zeros(2, programs, n_cols, device=y.device, dtype=torch.float32)
    if n_rows:
        _skip_gated_bwd_kernel[(programs,)](*args(partial[0], partial[1]), **constexprs, num_warps=warps)
    dd = partial[0].sum(0).view(D.numel(), -1).sum(-1).to(D.dtype)
    return dy, dz, dd, partial[1].sum(0).to(weight.dtype)


@torch.library.custom_op("flame::skip_gated_rms_norm_fwd", mutates_args=(), tags=ROW_STRIDED_OP_TAGS)
def _fwd_op(y: torch.Tensor, x: torch.Tensor, z: torch.Tensor, D: torch.Tensor, weight: torch.Tensor,
            eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _fwd_impl(y, x, z, D, weight, eps)


@_fwd_op.register_fake
def _(y, x, z, D, weight, eps):
    return y.new_empty(y.shape), y.new_empty(y.numel() // max(y.shape[-1], 1), dtype=torch.float32)


@torch.library.custom_op("flame::skip_gated_rms_norm_bwd", mutates_args=(), tags=ROW_STRIDED_OP_TAGS)
def _bwd_op(dout: torch.Tensor, y: torch.Tensor, x: torch.Tensor, z: torch.Tensor, D: torch.Tensor,
            weight: torch.Tensor, rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _bwd_impl(dout, y, x, z, D, weight, rstd)


@_bwd_op.register_fake
def _(dout, y, x, z, D, weight, rstd):
    return y.new_empty(y.shape), z.new_empty(z.shape), torch.empty_like(D), torch.empty_like(weight)


def _dx(dy: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
    heads = D.numel()
    shape = (*dy.shape[:-1], heads, dy.shape[-1] // heads)
    return (dy.reshape(shape) * D.to(dy.dtype)[:, None]).reshape(dy.shape)


def _setup(ctx, inputs, output):
    y, x, z, D, weight, _ = inputs
    ctx.save_for_backward(y, x, z, D, weight, output[1])


def _grads(ctx, dout, backward):
    y, x, z, D, weight, rstd = ctx.saved_tensors
    dy, dz, dD, dw = backward(dout, y, x, z, D, weight, rstd)
    return dy, _dx(dy, D), dz, dD, dw, None


def _op_backward(ctx, dout, drstd):
    return _grads(ctx, dout, _bwd_op)


_fwd_op.register_autograd(_op_backward, setup_context=_setup)


class _SkipGatedRMSNorm(torch.autograd.Function):
    """The custom ops' forward and backward for eager mode (less host dispatch per call)."""

    @staticmethod
    def forward(ctx, y, x, z, D, weight, eps):
        out, rstd = _fwd_impl(y, x, z, D, weight, eps)
        _setup(ctx, (y, x, z, D, weight, eps), (out, rstd))
        return out

    @staticmethod
    def backward(ctx, dout):
        return _grads(ctx, dout.contiguous(), _bwd_impl)


def skip_gated_rms_norm(y, x, D, z, weight, eps=1e-6):
    """rmsnorm((y + D[head] * x) * silu(z)) * weight over the last dimension, which holds
    len(D) heads of equal size; y, x, z of one shape (x and z may be channel slices)."""
    _check_inputs(y, x, D, z, weight)
    if use_triton(y, x, D, z, weight):
        if torch.compiler.is_compiling():
            return _fwd_op(y, x, z, D, weight, eps)[0]
        return _SkipGatedRMSNorm.apply(y, x, z, D, weight, eps)
    return skip_gated_rms_norm_ref(y, x, D, z, weight, eps)
