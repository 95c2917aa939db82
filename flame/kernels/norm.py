"""RMSNorm (optionally with the residual add fused in) and gated RMSNorm.

    y = x / sqrt(mean(x^2) + eps) * weight                      rms_norm
    y = x / sqrt(mean(x^2) + eps) * weight * act(gate)          gated_rms_norm, act = silu | sigmoid

Each has a pure-torch reference (`*_ref`, the CPU path and the test oracle) and a Triton kernel
that handles one row per program (rows up to 64K wide), forward and backward, wrapped as
`torch.library` custom ops so that torch.compile keeps them as single kernels.
The statistics are computed in fp32 whatever the input dtype.
"""

import torch
import triton
import triton.language as tl

from flame.kernels.dispatch import use_triton

ACTIVATIONS = ("silu", "sigmoid")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation={activation!r} is not one of {ACTIVATIONS}")


def _check_norm_inputs(x: torch.Tensor, weight: torch.Tensor, **others: torch.Tensor | None) -> None:
    if weight.dim() != 1 or x.shape[-1] != weight.shape[0]:
        raise ValueError(
            f"weight has shape {tuple(weight.shape)} but x has last dimension {x.shape[-1]}; "
            "weight must be 1-D with one entry per feature"
        )
    for name, t in others.items():
        if t is None:
            continue
        if t.shape != x.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}; it must match x's shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"x has dtype {x.dtype}; a floating-point dtype is needed")


# ----------------------------------------------------------------------------- references


def rms_norm_ref(x, weight, residual=None, eps=1e-6):
    """Returns (y, x + residual) when residual is given, else (y, None)."""
    out_dtype = x.dtype
    if residual is not None:
        x = x + residual
    ct = _compute_dtype(x.dtype)
    xf = x.to(ct)
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.to(ct)
    return y.to(out_dtype), (x if residual is not None else None)


def _act_ref(gate, activation):
    return torch.nn.functional.silu(gate) if activation == "silu" else torch.sigmoid(gate)


def gated_rms_norm_ref(x, gate, weight, eps=1e-6, activation="silu"):
    ct = _compute_dtype(x.dtype)
    xf = x.to(ct)
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.to(ct)
    return (y * _act_ref(gate.to(ct), activation)).to(x.dtype)


# ----------------------------------------------------------------------------- Triton kernels


@triton.jit
def _act_and_grad(g, IS_SILU: tl.constexpr):
    # returns act(g) and d act / d g, in fp32
    s = 1.0 / (1.0 + tl.exp(-g))
    if IS_SILU:
        return g * s, s * (1.0 + g * (1.0 - s))
    else:
        return s, s * (1.0 - s)


@triton.jit
def _rms_norm_fwd_kernel(
    x_ptr, res_ptr, gate_ptr, w_ptr, y_ptr, sum_ptr, rstd_ptr,
    n_cols, eps,
    HAS_RESIDUAL: tl.constexpr, HAS_GATE: tl.constexpr, IS_SILU: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    off = row * n_cols + cols
    x = tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        x += tl.load(res_ptr + off, mask=mask, other=0.0).to(tl.float32)
        tl.store(sum_ptr + off, x.to(sum_ptr.dtype.element_ty), mask=mask)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    tl.store(rstd_ptr + row, rstd)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    y = x * rstd * w
    if HAS_GATE:
        g = tl.load(gate_ptr + off, mask=mask, other=0.0).to(tl.float32)
        a, _ = _act_and_grad(g, IS_SILU)
        y = y * a
    tl.store(y_ptr + off, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_bwd_kernel(
    x_ptr, gate_ptr, w_ptr, rstd_ptr, dy_ptr, dres_ptr, dx_ptr, dgate_ptr, dw_ptr,
    n_rows, n_cols, rows_per_program,
    HAS_DRESIDUAL: tl.constexpr, HAS_GATE: tl.constexpr, IS_SILU: tl.constexpr, BLOCK: tl.constexpr,
):
    # Each program walks rows_per_program rows and keeps its partial weight gradient in
    # registers, so the weight gradient costs one small [programs, n_cols] write.
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    row_start = pid * rows_per_program
    for i in range(0, rows_per_program):
        row = row_start + i
        if row < n_rows:
            off = row.to(tl.int64) * n_cols + cols
            x = tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + off, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(rstd_ptr + row)
            xhat = x * rstd
            if HAS_GATE:
                g = tl.load(gate_ptr + off, mask=mask, other=0.0).to(tl.float32)
                a, da = _act_and_grad(g, IS_SILU)
                tl.store(dgate_ptr + off, (dy * xhat * w * da).to(dgate_ptr.dtype.element_ty), mask=mask)
                dy = dy * a
            dw += dy * xhat
            dxhat = dy * w
            dx = rstd * (dxhat - xhat * (tl.sum(dxhat * xhat, axis=0) / n_cols))
            if HAS_DRESIDUAL:
                dx += tl.load(dres_ptr + off, mask=mask, other=0.0).to(tl.float32)
            tl.store(dx_ptr + off, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    tl.store(dw_ptr + pid * n_cols + cols, dw, mask=mask)


def _block_and_warps(n_cols: int) -> tuple[int, int]:
    block = triton.next_power_of_2(n_cols)
    if block > 65536:
        raise ValueError(f"rows of {n_cols} features are wider than the 65536 this kernel handles")
    return block, min(max(block // 256, 1), 16)


def _num_programs(x: torch.Tensor, n_rows: int) -> int:
    if x.is_cuda:
        sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    else:
        sms = 4
    return max(1, min(n_rows, 8 * sms))


@torch.library.custom_op("flame::rms_norm_fwd", mutates_args=())
def _rms_norm_fwd(
    x: torch.Tensor, residual: torch.Tensor | None, gate: torch.Tensor | None, weight: torch.Tensor,
    eps: float, activation: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n_cols = x.shape[-1]
    x2 = x.reshape(-1, n_cols).contiguous()
    n_rows = x2.shape[0]
    y = torch.empty_like(x2)
    if residual is not None:
        summed = torch.empty_like(x2, dtype=torch.promote_types(x.dtype, residual.dtype))
    else:
        summed = x2.new_empty(0)
    rstd = torch.empty(n_rows, device=x.device, dtype=torch.float32)
    block, warps = _block_and_warps(n_cols)
    _rms_norm_fwd_kernel[(n_rows,)](
        x2, residual.reshape(-1, n_cols).contiguous() if residual is not None else x2,
        gate.reshape(-1, n_cols).contiguous() if gate is not None else x2,
        weight, y, summed, rstd, n_cols, eps,
        HAS_RESIDUAL=residual is not None, HAS_GATE=gate is not None, IS_SILU=activation == "silu",
        BLOCK=block, num_warps=warps,
    )
    return y.view_as(x), summed.view_as(x) if residual is not None else summed, rstd


@_rms_norm_fwd.register_fake
def _(x, residual, gate, weight, eps, activation):
    if residual is not None:
        summed = torch.empty_like(x, dtype=torch.promote_types(x.dtype, residual.dtype))
    else:
        summed = x.new_empty(0)
    return torch.empty_like(x), summed, x.new_empty(x.numel() // x.shape[-1], dtype=torch.float32)


@torch.library.custom_op("flame::rms_norm_bwd", mutates_args=())
def _rms_norm_bwd(
    dy: torch.Tensor, dresidual: torch.Tensor | None, x: torch.Tensor, gate: torch.Tensor | None,
    weight: torch.Tensor, rstd: torch.Tensor, activation: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n_cols = x.shape[-1]
    x2 = x.reshape(-1, n_cols).contiguous()
    dy2 = dy.reshape(-1, n_cols).contiguous()
    n_rows = x2.shape[0]
    dx = torch.empty_like(x2)
    dgate = torch.empty_like(x2) if gate is not None else x2.new_empty(0)
    programs = _num_programs(x2, n_rows)
    dw_partial = torch.empty(programs, n_cols, device=x.device, dtype=torch.float32)
    block, warps = _block_and_warps(n_cols)
    _rms_norm_bwd_kernel[(programs,)](
        x2, gate.reshape(-1, n_cols).contiguous() if gate is not None else x2, weight, rstd, dy2,
        dresidual.reshape(-1, n_cols).contiguous() if dresidual is not None else dy2,
        dx, dgate, dw_partial, n_rows, n_cols, triton.cdiv(n_rows, programs),
        HAS_DRESIDUAL=dresidual is not None, HAS_GATE=gate is not None, IS_SILU=activation == "silu",
        BLOCK=block, num_warps=warps,
    )
    dgate = dgate.view_as(x) if gate is not None else dgate
    return dx.view_as(x), dgate, dw_partial.sum(0).to(weight.dtype)


@_rms_norm_bwd.register_fake
def _(dy, dresidual, x, gate, weight, rstd, activation):
    dgate = torch.empty_like(x) if gate is not None else x.new_empty(0)
    return torch.empty_like(x), dgate, torch.empty_like(weight)


def _rms_norm_setup(ctx, inputs, output):
    x, residual, gate, weight, eps, activation = inputs
    _, summed, rstd = output
    ctx.has_residual = residual is not None
    ctx.activation = activation
    ctx.save_for_backward(summed if residual is not None else x, gate, weight, rstd)


def _rms_norm_backward(ctx, dy, dsummed, drstd):
    x, gate, weight, rstd = ctx.saved_tensors
    if dy is None:  # only the residual sum was used
        dy = torch.zeros_like(x)
    dresidual = dsummed if ctx.has_residual and dsummed is not None and dsummed.numel() else None
    dx, dgate, dw = _rms_norm_bwd(dy, dresidual, x, gate, weight, rstd, ctx.activation)
    return dx, (dx if ctx.has_residual else None), (dgate if gate is not None else None), dw, None, None


_rms_norm_fwd.register_autograd(_rms_norm_backward, setup_context=_rms_norm_setup)


# ----------------------------------------------------------------------------- public functions


def rms_norm(x, weight, residual=None, eps=1e-6):
    """RMSNorm of x (+ residual). Returns (y, x + residual) when residual is given, else (y, None)."""
    _check_norm_inputs(x, weight, residual=residual)
    if use_triton(x, weight, residual):
        y, summed, _ = _rms_norm_fwd(x, residual, None, weight, eps, "silu")
        return y, (summed if residual is not None else None)
    return rms_norm_ref(x, weight, residual, eps)


def gated_rms_norm(x, gate, weight, eps=1e-6, activation="silu"):
    """rms_norm(x) * weight * act(gate), act = silu or sigmoid."""
    _check_activation(activation)
    _check_norm_inputs(x, weight, gate=gate)
    if use_triton(x, gate, weight):
        return _rms_norm_fwd(x, None, gate, weight, eps, activation)[0]
    return gated_rms_norm_ref(x, gate, weight, eps, activation)
