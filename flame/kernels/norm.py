"""RMSNorm (optionally with the residual add fused in) and gated RMSNorm.

    y = x / sqrt(mean(x^2) + eps) * weight                      rms_norm
    y = x / sqrt(mean(x^2) + eps) * weight * act(gate)          gated_rms_norm, act = silu | sigmoid

Each has a pure-torch reference (`*_ref`, the CPU path and the test oracle) and Triton kernels
(rows up to 64K wide), wrapped as `torch.library` custom ops so that torch.compile keeps them as
single kernels: the forward handles one row per program; the backward is a persistent grid
whose programs walk tiles of rows, keeping the weight and their partial weight gradient in
registers.
The statistics are computed in fp32 whatever the input dtype.
"""

import torch
import triton
import triton.language as tl

from flame.kernels.dispatch import use_triton
from flame.kernels.utils import cdiv, next_power_of_2

ACTIVATIONS = ("silu", "sigmoid")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation={activation!r} is not one of {ACTIVATIONS}")


def _check_norm_inputs(inp: torch.Tensor, weight: torch.Tensor, inp_name: str = "x",
                       **others: torch.Tensor | None) -> None:
    """inp: the normalised input (called inp_name in messages); others: tensors of its shape."""
    if weight.dim() != 1 or inp.shape[-1] != weight.shape[0]:
        raise ValueError(
            f"weight has shape {tuple(weight.shape)} but {inp_name} has last dimension {inp.shape[-1]}; "
            "weight must be 1-D with one entry per feature"
        )
    for name, t in others.items():
        if t is None:
            continue
        if t.shape != inp.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}; it must match {inp_name}'s shape {tuple(inp.shape)}")
    if not inp.is_floating_point():
        raise ValueError(f"{inp_name} has dtype {inp.dtype}; a floating-point dtype is needed")


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
    n_rows, n_cols,
    HAS_DRESIDUAL: tl.constexpr, HAS_GATE: tl.constexpr, IS_SILU: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK: tl.constexpr,
):
    # Persistent: the grid is what fits on the device at once and program p takes the tiles of
    # BLOCK_M rows starting at p * BLOCK_M, then every P * BLOCK_M rows. The weight and the
    # partial weight gradient stay in registers across tiles, so the weight gradient costs one
    # small [P, n_cols] fp32 write. The next tile's inputs are loaded before this tile is reduced
    # and stored (the compiler does not pipeline loads that feed no dot), which keeps two tiles of
    # reads in flight per program instead of stalling on each row's round trip.
    pid = tl.program_id(0)
    step = tl.num_programs(0) * BLOCK_M
    cols = tl.arange(0, BLOCK)
    cmask = cols < n_cols
    w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    dw = tl.zeros([BLOCK_M, BLOCK], dtype=tl.float32)

    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    mask = (rows < n_rows)[:, None] & cmask[None, :]
    off = rows.to(tl.int64)[:, None] * n_cols + cols[None, :]
    x_raw = tl.load(x_ptr + off, mask=mask, other=0.0)
    dy_raw = tl.load(dy_ptr + off, mask=mask, other=0.0)
    rstd = tl.load(rstd_ptr + rows, mask=rows < n_rows, other=0.0)
    if HAS_GATE:
        g_raw = tl.load(gate_ptr + off, mask=mask, other=0.0)
    if HAS_DRESIDUAL:
        dres_raw = tl.load(dres_ptr + off, mask=mask, other=0.0)

    for first_next in range(pid * BLOCK_M + step, n_rows + step, step):
        rows_next = first_next + tl.arange(0, BLOCK_M)
        mask_next = (rows_next < n_rows)[:, None] & cmask[None, :]
        off_next = rows_next.to(tl.int64)[:, None] * n_cols + cols[None, :]
        x_next = tl.load(x_ptr + off_next, mask=mask_next, other=0.0)
        dy_next = tl.load(dy_ptr + off_next, mask=mask_next, other=0.0)
        rstd_next = tl.load(rstd_ptr + rows_next, mask=rows_next < n_rows, other=0.0)
        if HAS_GATE:
            g_next = tl.load(gate_ptr + off_next, mask=mask_next, other=0.0)
        if HAS_DRESIDUAL:
            dres_next = tl.load(dres_ptr + off_next, mask=mask_next, other=0.0)

        xhat = x_raw.to(tl.float32) * rstd[:, None]
        dy = dy_raw.to(tl.float32)
        if HAS_GATE:
            a, da = _act_and_grad(g_raw.to(tl.float32), IS_SILU)
            tl.store(dgate_ptr + off, (dy * xhat * w * da).to(dgate_ptr.dtype.element_ty), mask=mask)
            dy = dy * a
        dw += dy * xhat
        dxhat = dy * w
        dx = rstd[:, None] * (dxhat - xhat * (tl.sum(dxhat * xhat, axis=1) / n_cols)[:, None])
        if HAS_DRESIDUAL:
            dx += dres_raw.to(tl.float32)
        tl.store(dx_ptr + off, dx.to(dx_ptr.dtype.element_ty), mask=mask)

        mask, off, x_raw, dy_raw, rstd = mask_next, off_next, x_next, dy_next, rstd_next
        if HAS_GATE:
            g_raw = g_next
        if HAS_DRESIDUAL:
            dres_raw = dres_next
    tl.store(dw_ptr + pid * n_cols + cols, tl.sum(dw, axis=0), mask=cmask)


def _block_and_warps(n_cols: int) -> tuple[int, int]:
    block = next_power_of_2(n_cols)
    if block > 65536:
        raise ValueError(f"rows of {n_cols} features are wider than the 65536 this kernel handles")
    return block, min(max(block // 256, 1), 16)


_BWD_TILE_ELEMENTS = 2048


def _bwd_tile(n_cols: int) -> tuple[int, int, int]:
    """Rows per tile, padded row width and warps of the backward kernel: tiles of at least 2048
    elements (so that narrow rows, such as per-head gated norms, still move a few KB per load),
    8 elements of each tensor per thread."""
    block, _ = _block_and_warps(n_cols)
    rows = max(1, _BWD_TILE_ELEMENTS // block)
    return rows, block, min(max(rows * block // 256, 1), 16)


_RESIDENT: dict = {}


def _resident_programs(kernel, args: tuple, constexprs: dict, num_warps: int, device: torch.device) -> int:
    """How many programs of this compiled kernel fit on the device at once (registers, threads and
    shared memory per SM), so that a persistent grid runs in exactly one wave."""
    key = (kernel.fn.__name__, device.index,
           tuple(a.dtype if isinstance(a, torch.Tensor) else type(a) for a in args),
           tuple(sorted(constexprs.items())), num_warps)
    if key not in _RESIDENT:
        props = torch.cuda.get_device_properties(device)
        per_sm = 2  # what always fits (at most 16 warps of 128 registers); used if the query fails
        try:
            compiled = kernel.warmup(*args, **constexprs, num_warps=num_warps, grid=(1,))
            compiled._init_handles()
            threads = 32 * num_warps
            per_sm = min(props.max_threads_per_multi_processor // threads,
                         props.regs_per_multiprocessor // max(compiled.n_regs * threads, 1))
            if compiled.metadata.shared:
                per_sm = min(per_sm, props.shared_memory_per_multiprocessor // compiled.metadata.shared)
        except Exception:  # only a performance hint: keep the conservative count
            pass
        _RESIDENT[key] = props.multi_processor_count * max(per_sm, 1)
    return _RESIDENT[key]


def _num_programs(kernel, args: tuple, constexprs: dict, num_warps: int, n_tiles: int) -> int:
    """Programs of a persistent grid over n_tiles tiles; args[0] is a tensor on the target device."""
    x = args[0]
    if x.is_cuda:
        resident = _resident_programs(kernel, args, constexprs, num_warps, x.device)
    else:
        resident = 4  # the interpreter: a few programs, each walking several tiles
    return max(1, min(n_tiles, resident))


def _rms_norm_fwd_impl(x, residual, gate, weight, eps, activation):
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


@torch.library.custom_op("flame::rms_norm_fwd", mutates_args=())
def _rms_norm_fwd(
    x: torch.Tensor, residual: torch.Tensor | None, gate: torch.Tensor | None, weight: torch.Tensor,
    eps: float, activation: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _rms_norm_fwd_impl(x, residual, gate, weight, eps, activation)


@_rms_norm_fwd.register_fake
def _(x, residual, gate, weight, eps, activation):
    if residual is not None:
        summed = torch.empty_like(x, dtype=torch.promote_types(x.dtype, residual.dtype))
    else:
        summed = x.new_empty(0)
    return torch.empty_like(x), summed, x.new_empty(x.numel() // x.shape[-1], dtype=torch.float32)


def _rms_norm_bwd_impl(dy, dresidual, x, gate, weight, rstd, activation):
    n_cols = x.shape[-1]
    x2 = x.reshape(-1, n_cols).contiguous()
    dy2 = dy.reshape(-1, n_cols).contiguous()
    n_rows = x2.shape[0]
    dx = torch.empty_like(x2)
    dgate = torch.empty_like(x2) if gate is not None else x2.new_empty(0)
    rows_per_tile, block, warps = _bwd_tile(n_cols)
    gate2 = gate.reshape(-1, n_cols).contiguous() if gate is not None else x2
    dres2 = dresidual.reshape(-1, n_cols).contiguous() if dresidual is not None else dy2
    constexprs = dict(HAS_DRESIDUAL=dresidual is not None, HAS_GATE=gate is not None,
                      IS_SILU=activation == "silu", BLOCK_M=rows_per_tile, BLOCK=block)

    def args(dw_partial):
        return (x2, gate2, weight, rstd, dy2, dres2, dx, dgate, dw_partial, n_rows, n_cols)

    programs = _num_programs(_rms_norm_bwd_kernel, args(rstd), constexprs, warps,
                             cdiv(n_rows, rows_per_tile))
    dw_partial = torch.empty(programs, n_cols, device=x.device, dtype=torch.float32)
    _rms_norm_bwd_kernel[(programs,)](*args(dw_partial), **constexprs, num_warps=warps)
    dgate = dgate.view_as(x) if gate is not None else dgate
    return dx.view_as(x), dgate, dw_partial.sum(0).to(weight.dtype)


@torch.library.custom_op("flame::rms_norm_bwd", mutates_args=())
def _rms_norm_bwd(
    dy: torch.Tensor, dresidual: torch.Tensor | None, x: torch.Tensor, gate: torch.Tensor | None,
    weight: torch.Tensor, rstd: torch.Tensor, activation: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _rms_norm_bwd_impl(dy, dresidual, x, gate, weight, rstd, activation)


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


def _rms_norm_grads(ctx, dy, dsummed, backward):
    x, gate, weight, rstd = ctx.saved_tensors
    if dy is None:  # only the residual sum was used
        dy = torch.zeros_like(x)
    dresidual = dsummed if ctx.has_residual and dsummed is not None and dsummed.numel() else None
    dx, dgate, dw = backward(dy, dresidual, x, gate, weight, rstd, ctx.activation)
    return dx, (dx if ctx.has_residual else None), (dgate if gate is not None else None), dw, None, None


def _rms_norm_backward(ctx, dy, dsummed, drstd):
    return _rms_norm_grads(ctx, dy, dsummed, _rms_norm_bwd)


_rms_norm_fwd.register_autograd(_rms_norm_backward, setup_context=_rms_norm_setup)


class _RMSNormFunction(torch.autograd.Function):
    """The same forward and backward as the custom ops, for eager mode: an autograd.Function
    costs the host a fraction of a custom op's dispatch (tens of microseconds per call), which
    matters at these kernels' sub-millisecond times. torch.compile traces the custom ops."""

    @staticmethod
    def forward(ctx, x, residual, gate, weight, eps, activation):
        y, summed, rstd = _rms_norm_fwd_impl(x, residual, gate, weight, eps, activation)
        _rms_norm_setup(ctx, (x, residual, gate, weight, eps, activation), (y, summed, rstd))
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(rstd, *(() if residual is not None else (summed,)))
        return y, summed, rstd

    @staticmethod
    def backward(ctx, dy, dsummed, drstd):
        return _rms_norm_grads(ctx, dy, dsummed, _rms_norm_bwd_impl)


def _rms_norm_op(x, residual, gate, weight, eps, activation):
    if torch.compiler.is_compiling():
        return _rms_norm_fwd(x, residual, gate, weight, eps, activation)
    return _RMSNormFunction.apply(x, residual, gate, weight, eps, activation)


# ----------------------------------------------------------------------------- public functions


def rms_norm(x, weight, residual=None, eps=1e-6):
    """RMSNorm of x (+ residual). Returns (y, x + residual) when residual is given, else (y, None)."""
    _check_norm_inputs(x, weight, residual=residual)
    if use_triton(x, weight, residual):
        y, summed, _ = _rms_norm_op(x, residual, None, weight, eps, "silu")
        return y, (summed if residual is not None else None)
    return rms_norm_ref(x, weight, residual, eps)


def gated_rms_norm(x, gate, weight, eps=1e-6, activation="silu"):
    """rms_norm(x) * weight * act(gate), act = silu or sigmoid."""
    _check_activation(activation)
    _check_norm_inputs(x, weight, gate=gate)
    if use_triton(x, gate, weight):
        return _rms_norm_op(x, None, gate, weight, eps, activation)[0]
    return gated_rms_norm_ref(x, gate, weight, eps, activation)
