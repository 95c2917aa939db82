"""Fused linear cross-entropy: the loss of x @ weight.T (+ bias) without the N x V logits.

The tokens are processed in chunks, all written into one logits buffer of at most ~512 MiB
(2048 tokens at vocabulary 128256 in bf16), which is the whole extra memory of a call besides
the gradients themselves. For each chunk:
    logits = x_c @ weight.T          (cuBLAS into the buffer; bf16 out, fp32 accumulation)
    per row: logsumexp, target logit, sum of logits          (one read of the chunk)
    logits <- d loss / d logits, in place                     (one read and one write)
    dx_c = dlogits @ weight;  dweight += dlogits.T @ x_c;  dbias += dlogits.sum(0)
The weight-gradient matmul reads and writes the whole V x D accumulator once per chunk, so
its cost falls as chunks grow: the buffer is spent on as many tokens per chunk as fit.
With reduction "mean" or "sum" the output gradient is a scalar, so the gradients are computed in
the forward pass (three matmuls in all, no recomputation) and only scaled in backward. With
"none" the forward keeps the per-token logsumexp and backward recomputes the logits with the
per-token output gradients folded in. The output gradient is a device scalar (no host sync):
its multiply over the gradients is a kernel that returns at once when it is 1, the usual case.

The mean divides by the number of non-ignored tokens counted on the device (clamped at 1, so a
batch with every token ignored has loss 0), so nothing waits on the host.

Vocab-parallel: with process_group, weight (and bias) are this rank's contiguous slice of the
vocabulary (equal slices, rank r holding rows r*V_local:(r+1)*V_local); targets are global ids.
The per-row logsumexp, target logit and logit sum are combined with all-reduces, every rank gets
the same loss, and the gradient of x is all-reduced (x is replicated over the group).

Target range: on CPU an out-of-range target (other than ignore_index) raises ValueError. On CUDA
the same check runs on the device with torch._assert_async (no host sync), so a bad target
surfaces as a device-side assertion at the next synchronisation.
"""

import torch
import torch.distributed as dist
import triton
import triton.language as tl

from flame.kernels.cross_entropy_ref import REDUCTIONS, logit_grad_ref_, logit_stats_ref
from flame.kernels.dispatch import use_triton
from flame.kernels.utils import cdiv, next_power_of_2

CHUNK_BYTES = 512 * 2**20  # the logits buffer: the extra memory of a call besides the gradients


# ----------------------------------------------------------------------------- Triton kernels


@triton.jit
def _softcap(raw, cap, HAS_SOFTCAP: tl.constexpr):
    if HAS_SOFTCAP:
        # cap * tanh(raw / cap), written with exp so that it saturates cleanly at +-cap
        return cap * (1.0 - 2.0 / (tl.exp(2.0 * raw / cap) + 1.0))
    else:
        return raw


@triton.jit
def _logit_stats_kernel(
    logits_ptr, stride, target_ptr, lse_ptr, zt_ptr, zsum_ptr, n_cols, softcap,
    HAS_SOFTCAP: tl.constexpr, HAS_ZSUM: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride
    target = tl.load(target_ptr + row)
    # the target logit is one load, not a compare per logit; 0 when the target is ignored or
    # lies in another rank's vocabulary shard
    inside = (target >= 0) & (target < n_cols)
    zt = _softcap(tl.load(base + tl.where(inside, target, 0)).to(tl.float32), softcap, HAS_SOFTCAP)
    tl.store(zt_ptr + row, tl.where(inside, zt, 0.0))
    cols = tl.arange(0, BLOCK)
    # Each lane keeps its own running max m and sum s of exp(z - m): one exp per logit and no
    # cross-lane reduction inside the loop (they are done once, at the end). The finite start
    # keeps a masked lane's exp(-inf - m) an exact 0 instead of inf - inf.
    m = tl.full([BLOCK], -1e30, tl.float32)
    s = tl.zeros([BLOCK], tl.float32)
    zsum = tl.zeros([BLOCK], tl.float32)
    for start in range(0, n_cols, BLOCK):
        idx = start + cols
        mask = idx < n_cols
        z = _softcap(tl.load(base + idx, mask=mask, other=0.0).to(tl.float32), softcap, HAS_SOFTCAP)
        if HAS_ZSUM:
            zsum += tl.where(mask, z, 0.0)
        z = tl.where(mask, z, float("-inf"))
        e = tl.exp(-tl.abs(z - m))  # exp(m - z) for a new max, else exp(z - m)
        s = tl.where(z > m, s * e + 1.0, s + e)
        m = tl.maximum(m, z)
    m_row = tl.max(m, axis=0)
    tl.store(lse_ptr + row, m_row + tl.log(tl.sum(s * tl.exp(m - m_row), axis=0)))
    tl.store(zsum_ptr + row, tl.sum(zsum, axis=0))


@triton.jit
def _logit_grad_kernel(
    logits_ptr, stride, target_ptr, lse_ptr, scale_ptr, n_cols,
    smooth_per_logit, one_minus_smooth, z_loss, softcap,
    HAS_SOFTCAP: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride
    target = tl.load(target_ptr + row)
    lse = tl.load(lse_ptr + row)
    scale = tl.load(scale_ptr + row)
    p_scale = 1.0 + 2.0 * z_loss * lse
    cols = tl.arange(0, BLOCK)
    for start in range(0, n_cols, BLOCK):
        idx = start + cols
        mask = idx < n_cols
        raw = tl.load(base + idx, mask=mask, other=0.0).to(tl.float32)
        z = _softcap(raw, softcap, HAS_SOFTCAP)
        g = tl.exp(z - lse) * p_scale - smooth_per_logit - tl.where(idx == target, one_minus_smooth, 0.0)
        if HAS_SOFTCAP:
            t = z / softcap
            g = g * (1.0 - t * t)
        tl.store(base + idx, (g * scale).to(logits_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _scale_unless_one_kernel(x_ptr, scale_ptr, n, BLOCK: tl.constexpr):
    # x *= scale, in place; with scale == 1 (loss.backward() of the loss itself) every program
    # returns after one load, so the common case costs no pass over the gradients
    scale = tl.load(scale_ptr)
    if scale != 1.0:
        for block in range(tl.program_id(0), tl.cdiv(n, BLOCK), tl.num_programs(0)):
            offs = block * tl.full([BLOCK], BLOCK, tl.int64) + tl.arange(0, BLOCK)  # int64: > 2**31 elements
            mask = offs < n
            v = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(x_ptr + offs, (v * scale).to(x_ptr.dtype.element_ty), mask=mask)


_BLOCK_V = 4096  # logits per row and loop step of the gradient kernel
_BLOCK_V_STATS = 2048  # of the statistics kernel: its per-lane max and sum cost registers
_BLOCK_SCALE = 4096


def _logit_stats_triton(logits, target_local, softcap, need_zsum):
    """As logit_stats_ref, except that the logit sum is 0 unless need_zsum (label smoothing)."""
    n, v = logits.shape
    lse = torch.empty(n, device=logits.device, dtype=torch.float32)
    zt, zsum = torch.empty_like(lse), torch.empty_like(lse)
    _logit_stats_kernel[(n,)](
        logits, logits.stride(0), target_local, lse, zt, zsum, v, softcap or 1.0,
        HAS_SOFTCAP=softcap is not None, HAS_ZSUM=need_zsum,
        BLOCK=min(_BLOCK_V_STATS, next_power_of_2(v)), num_warps=8,
    )
    return lse, zt, zsum


def _logit_grad_triton_(logits, target_local, lse, row_scale, label_smoothing, z_loss, softcap, vocab_size):
    n, v = logits.shape
    _logit_grad_kernel[(n,)](
        logits, logits.stride(0), target_local, lse, row_scale.float().contiguous(), v,
        label_smoothing / vocab_size, 1.0 - label_smoothing, z_loss, softcap or 1.0,
        HAS_SOFTCAP=softcap is not None, BLOCK=min(_BLOCK_V, next_power_of_2(v)), num_warps=8,
    )
    return logits


def _programs_for(device):
    if device.type != "cuda":
        return 4
    return 8 * torch.cuda.get_device_properties(device).multi_processor_count


def _scale_(g, grad_out, triton_kernels):
    """g *= grad_out in place, grad_out a 0-dim tensor, without reading it on the host."""
    if not triton_kernels or g.dtype == torch.float64:
        return g.mul_(grad_out.to(g.dtype))
    scale = grad_out.detach().to(torch.float32).reshape(1)
    n = g.numel()
    grid = (max(1, min(cdiv(n, _BLOCK_SCALE), _programs_for(g.device))),)
    _scale_unless_one_kernel[grid](g, scale, n, BLOCK=_BLOCK_SCALE, num_warps=4)
    return g


# ----------------------------------------------------------------------------- the chunked algorithm


class _Options:
    def __init__(self, ignore_index, reduction, label_smoothing, z_loss, softcap, process_group,
                 chunk_size, triton_rows, vocab_start, vocab_size, fp32_weight_grad):
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.softcap = softcap
        self.group = process_group
        self.chunk_size = chunk_size
        self.triton_rows = triton_rows
        self.vocab_start = vocab_start
        self.vocab_size = vocab_size  # over all shards
        self.fp32_weight_grad = fp32_weight_grad


def _all_reduce(t, op, group):
    if group is not None:
        dist.all_reduce(t, op=op, group=group)
    return t


def _chunk_logits_(out, x_c, weight, bias):
    if bias is None:
        return torch.mm(x_c, weight.T, out=out)
    return torch.addmm(bias, x_c, weight.T, out=out)


def _row_stats(logits, target_local, opt):
    """Global (over vocab shards) logsumexp, target logit and logit sum of each row."""
    if opt.triton_rows:
        lse, zt, zsum = _logit_stats_triton(logits, target_local, opt.softcap, opt.label_smoothing > 0)
    else:
        lse, zt, zsum = logit_stats_ref(logits, target_local, opt.softcap)
    if opt.group is not None:
        top = _all_reduce(lse.clone(), dist.ReduceOp.MAX, opt.group)
        total = _all_reduce(torch.exp(lse - top), dist.ReduceOp.SUM, opt.group)
        lse = top + torch.log(total)
        _all_reduce(zt, dist.ReduceOp.SUM, opt.group)
        _all_reduce(zsum, dist.ReduceOp.SUM, opt.group)
    return lse, zt, zsum


def _row_grads_(logits, target_local, lse, row_scale, opt):
    grad = _logit_grad_triton_ if opt.triton_rows else logit_grad_ref_
    return grad(logits, target_local, lse, row_scale, opt.label_smoothing, opt.z_loss, opt.softcap,
                opt.vocab_size)


def _addmm_fp32_(acc, a, b):
    """acc += a @ b with acc fp32 and a, b in a lower precision."""
    if acc.is_cuda:
        # cuBLAS reads and writes the fp32 accumulator directly: no low-precision partial product
        torch.ops.aten.addmm.dtype_out(acc, a, b, torch.float32, out=acc)
    else:
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


def _acc_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _run_chunks(x, weight, bias, target_local, opt, row_scale, grads, lse_known=None):
    """One pass over the token chunks. Returns (per-token loss or None, per-token lse, dx, dweight,
    dbias); the gradients are computed only where `grads` = (x?, weight?, bias?) asks, each row
    of d loss / d logits multiplied by row_scale."""
    n = x.shape[0]
    acc = _acc_dtype(x)
    want_dx, want_dw, want_db = grads
    dx = torch.empty_like(x) if want_dx else None
    fp32_dw = want_dw and opt.fp32_weight_grad and weight.dtype not in (torch.float32, torch.float64)
    # in weight.dtype the first chunk's matmul creates dw (no zero fill, no read of zeros)
    dw = torch.zeros_like(weight, dtype=torch.float32) if fp32_dw else None
    db = torch.zeros_like(bias, dtype=acc) if want_db else None
    if lse_known is None:
        lse_all, zt_all, zsum_all = (torch.empty(n, device=x.device, dtype=acc) for _ in range(3))
    else:
        lse_all = lse_known
    # one buffer for every chunk's logits (then its gradient): the memory of a call is this
    buf = torch.empty(min(opt.chunk_size, n), weight.shape[0], device=x.device, dtype=x.dtype)
    for start in range(0, n, opt.chunk_size):
        end = min(start + opt.chunk_size, n)
        x_c, t_c = x[start:end], target_local[start:end]
        logits = _chunk_logits_(buf[: end - start], x_c, weight, bias)
        if lse_known is None:
            lse, zt, zsum = _row_stats(logits, t_c, opt)
            lse_all[start:end], zt_all[start:end], zsum_all[start:end] = lse, zt, zsum
        else:
            lse = lse_known[start:end]
        if not any(grads):
            continue
        dlogits = _row_grads_(logits, t_c, lse, row_scale[start:end], opt)
        if want_dx:
            torch.mm(dlogits, weight, out=dx[start:end])
        if fp32_dw:
            _addmm_fp32_(dw, dlogits.T, x_c)
        elif want_dw and dw is None:
            dw = torch.mm(dlogits.T, x_c)
        elif want_dw:
            dw.addmm_(dlogits.T, x_c)
        if want_db:
            db += torch.sum(dlogits, 0, dtype=acc)  # fp32 sum without an fp32 copy of the chunk
    del buf
    if want_dx and opt.group is not None:
        _all_reduce(dx, dist.ReduceOp.SUM, opt.group)
    if fp32_dw:
        dw = dw.to(weight.dtype)
    elif want_dw and dw is None:  # no tokens
        dw = torch.zeros_like(weight)
    loss = None
    if lse_known is None:
        eps = opt.label_smoothing
        loss = lse_all - (1 - eps) * zt_all + opt.z_loss * lse_all * lse_all
        if eps > 0:
            loss = loss - (eps / opt.vocab_size) * zsum_all
    return loss, lse_all, dx, dw, db


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, target, opt, grads):
        valid = target != opt.ignore_index
        target_local = torch.where(valid, target - opt.vocab_start, -1)
        n_valid = valid.sum().clamp(min=1)
        ctx.opt, ctx.grads = opt, grads
        if opt.reduction == "none":
            row_scale = valid.to(_acc_dtype(x))
            loss, lse, _, _, _ = _run_chunks(x, weight, bias, target_local, opt, row_scale, (False,) * 3)
            ctx.save_for_backward(x, weight, bias, target_local, lse, valid)
            return loss * valid
        row_scale = valid.to(_acc_dtype(x))
        if opt.reduction == "mean":
            row_scale = row_scale / n_valid
        loss, _, dx, dw, db = _run_chunks(x, weight, bias, target_local, opt, row_scale, grads)
        ctx.save_for_backward(dx, dw, db)
        ctx.used = False
        total = (loss * valid).sum()
        return total / n_valid if opt.reduction == "mean" else total

    @staticmethod
    def backward(ctx, grad_out):
        opt = ctx.opt
        if opt.reduction == "none":
            x, weight, bias, target_local, lse, valid = ctx.saved_tensors
            row_scale = grad_out.to(_acc_dtype(x)) * valid
            _, _, dx, dw, db = _run_chunks(x, weight, bias, target_local, opt, row_scale, ctx.grads, lse_known=lse)
        else:
            if ctx.used:
                raise RuntimeError("fused_linear_cross_entropy: backward through the same graph twice is not supported")
            ctx.used = True
            dx, dw, db = ctx.saved_tensors
            # gradients were computed in forward for a unit output gradient; scale in place
            for g in (dx, dw, db):
                if g is not None:
                    _scale_(g, grad_out, opt.triton_rows)
        return dx, dw, db, None, None, None


# ----------------------------------------------------------------------------- public function


def default_chunk_size(n, v_local, element_size):
    """Tokens per chunk: as many as fit one CHUNK_BYTES logits buffer (a multiple of 128 rows,
    the matmul tile), then evened out over the chunks that n needs, so that the last chunk is
    not a sliver (3000 tokens at the 2048 cap: two chunks of 1536, not 2048 + 952)."""
    cap = max(1, CHUNK_BYTES // (v_local * element_size))
    if cap >= 128:
        cap = cap // 128 * 128
    chunks = max(1, -(-n // cap))
    rows = -(-n // chunks)
    if cap >= 128:
        rows = min(cap, -(-rows // 128) * 128)
    return max(1, rows)


def _check_inputs(x, weight, target, bias, ignore_index, reduction, label_smoothing, z_loss, logit_softcap):
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r} is not one of {REDUCTIONS}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing={label_smoothing} must be in [0, 1)")
    if z_loss < 0:
        raise ValueError(f"z_loss={z_loss} must be >= 0")
    if logit_softcap is not None and not logit_softcap > 0:
        raise ValueError(f"logit_softcap={logit_softcap} must be positive or None")
    if x.dim() != 2:
        raise ValueError(f"x has shape {tuple(x.shape)}; it must be [N, D] (flatten batch and time)")
    if weight.dim() != 2 or weight.shape[1] != x.shape[1]:
        raise ValueError(f"weight has shape {tuple(weight.shape)}; it must be [V, D] with D = {x.shape[1]} like x")
    if target.shape != (x.shape[0],):
        raise ValueError(f"target has shape {tuple(target.shape)}; it must be [N] = [{x.shape[0]}] like x's rows")
    if target.is_floating_point() or target.dtype == torch.bool:
        raise ValueError(f"target has dtype {target.dtype}; it must hold integer class ids")
    if not x.is_floating_point():
        raise ValueError(f"x has dtype {x.dtype}; it must be floating point")
    if weight.dtype != x.dtype:
        raise ValueError(f"weight has dtype {weight.dtype} but x has {x.dtype}; cast one so that they match")
    if bias is not None:
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias has shape {tuple(bias.shape)}; it must be [V] = [{weight.shape[0]}]")
        if bias.dtype != x.dtype:
            raise ValueError(f"bias has dtype {bias.dtype} but x has {x.dtype}; cast one so that they match")


def _check_target_range(target, ignore_index, vocab_size):
    ok = ((target >= 0) & (target < vocab_size)) | (target == ignore_index)
    if target.is_cuda:
        torch._assert_async(ok.all(), f"fused_linear_cross_entropy: target outside [0, {vocab_size}) "
                                      f"and not ignore_index={ignore_index}")
    elif not bool(ok.all()):
        bad = target[~ok][:5].tolist()
        raise ValueError(
            f"target holds ids outside [0, {vocab_size}) that are not ignore_index={ignore_index}: {bad}"
        )


@torch.compiler.disable  # a loop over chunks with collectives: run eagerly inside compiled models
def fused_linear_cross_entropy(x, weight, target, bias=None, ignore_index=-100, reduction="mean",
                               label_smoothing=0.0, z_loss=0.0, logit_softcap=None, process_group=None,
                               chunk_size=None, fp32_weight_grad=False):
    """Cross-entropy of the logits x @ weight.T (+ bias) against target, never storing them whole.

    x [N, D], weight [V, D] (this rank's vocabulary slice when process_group is given), target
    [N] of global ids, bias [V] or None. Returns a scalar for "mean" (over non-ignored tokens) and
    "sum", or [N] per-token losses (0 at ignored tokens) for "none". chunk_size: tokens per chunk
    (default: default_chunk_size, one logits buffer of at most CHUNK_BYTES).

    The weight gradient of each chunk is one matmul with fp32 accumulation; across chunks it is
    summed in weight.dtype, which keeps the extra memory at the one logits buffer. fp32_weight_grad=True
    sums across chunks in an fp32 buffer instead (V x D x 4 bytes more: 2 GiB at 128256 x 4096).
    """
    _check_inputs(x, weight, target, bias, ignore_index, reduction, label_smoothing, z_loss, logit_softcap)
    v_local = weight.shape[0]
    world = dist.get_world_size(process_group) if process_group is not None else 1
    rank = dist.get_rank(process_group) if process_group is not None else 0
    _check_target_range(target, ignore_index, v_local * world)
    if chunk_size is None:
        chunk_size = default_chunk_size(x.shape[0], v_local, x.element_size())
    elif chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1")
    opt = _Options(ignore_index, reduction, float(label_smoothing), float(z_loss),
                   None if logit_softcap is None else float(logit_softcap), process_group, chunk_size,
                   use_triton(x, weight), rank * v_local, v_local * world, bool(fp32_weight_grad))
    grad_on = torch.is_grad_enabled()
    grads = (grad_on and x.requires_grad, grad_on and weight.requires_grad,
             grad_on and bias is not None and bias.requires_grad)
    return _FusedLinearCrossEntropy.apply(x.contiguous(), weight.contiguous(), bias, target.contiguous(), opt, grads)
