"""Short causal depthwise convolution over [B, T, C] with packed documents, and its decode step.

    y[t, c] = act(bias[c] + sum_k weight[c, k] * x[t - (K-1) + k, c]),   act = silu or none

A tap that reaches before the start of its document reads the document's initial state (the
last K-1 inputs of what came before, `cache[n, c, K-1-i]` holding the input i steps back) or
zero, so packed documents never see each other. The final state holds the last K-1 inputs of
each document (oldest first). With cu_seqlens, x is [1, L, C] and documents are
cu_seqlens[n]:cu_seqlens[n+1]; without it, each of the B rows is a document.
"""

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from flame.kernels.dispatch import use_triton
from flame.kernels.norm import _num_programs
from flame.kernels.utils import ROW_STRIDED_OP_TAGS, cdiv, next_power_of_2

ACTIVATIONS = ("silu", None)


def _documents(x: torch.Tensor, cu_seqlens: torch.Tensor | None):
    """Flattened x [L, C], cu_seqlens [N+1] (int64), and per token its document and start."""
    b, t, c = x.shape
    if cu_seqlens is None:
        cu = torch.arange(b + 1, device=x.device, dtype=torch.int64) * t
    else:
        cu = cu_seqlens.to(torch.int64)
    positions = torch.arange(b * t, device=x.device)
    doc = torch.searchsorted(cu[1:], positions, right=True)
    return x.reshape(b * t, c), cu, doc, cu[doc]


def _input_at(xf, cache, doc, start, src, k):
    """Input at flattened position src (a tensor of the same shape as doc), for each token's
    document: x itself inside the document, the initial state before it, zero beyond that."""
    inside = src >= start
    if xf.shape[0] == 0:  # an empty input: every tap lies before its document
        val = xf.new_zeros(src.shape[0], xf.shape[1])
    else:
        val = xf[src.clamp(min=0).clamp(max=xf.shape[0] - 1)] * inside[:, None]
    if cache is not None:
        back = start - src  # 1 .. K-1 steps before the start reads the initial state
        from_cache = (~inside) & (back <= k - 1)
        idx = (k - 1 - back).clamp(min=0, max=k - 2)
        val = val + cache[doc, :, idx] * from_cache[:, None]
    return val


def causal_conv1d_ref(x, weight, bias=None, activation="silu", cu_seqlens=None, initial_state=None,
                      output_final_state=False):
    """x [B, T, C], weight [C, K] -> (y [B, T, C], final_state [N, C, K-1] or None)."""
    k = weight.shape[-1]
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf, cu, doc, start = _documents(x.to(ct), cu_seqlens)
    cache = initial_state.to(ct) if initial_state is not None else None
    positions = torch.arange(xf.shape[0], device=x.device)
    y = torch.zeros_like(xf) if bias is None else bias.to(ct).expand_as(xf).clone()
    for i in range(k):
        y = y + _input_at(xf, cache, doc, start, positions - (k - 1 - i), k) * weight[:, i].to(ct)
    if activation == "silu":
        y = torch.nn.functional.silu(y)
    final = None
    if output_final_state:
        n = cu.shape[0] - 1
        ends = cu[1:]
        starts = cu[:-1]
        docs = torch.arange(n, device=x.device)
        cols = [
            _input_at(xf, cache, docs, starts, ends - (k - 1 - i), k) for i in range(k - 1)
        ]
        final = torch.stack(cols, dim=-1).to(x.dtype) if cols else xf.new_zeros(n, xf.shape[1], 0)
    return y.to(x.dtype).view_as(x), final


def causal_conv1d_step_ref(x, cache, weight, bias=None, activation="silu"):
    """One decoding step: x [N, C], cache [N, C, K-1] -> (y [N, C], new cache)."""
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    window = torch.cat([cache.to(ct), x.to(ct)[:, :, None]], dim=-1)  # [N, C, K]
    y = (window * weight.to(ct)).sum(-1)
    if bias is not None:
        y = y + bias.to(ct)
    if activation == "silu":
        y = torch.nn.functional.silu(y)
    return y.to(x.dtype), window[:, :, 1:].to(cache.dtype)


# ----------------------------------------------------------------------------- Triton kernels


# Each program owns BLOCK_C channels (contiguous: four per thread, 8- or 16-byte vectors) and a
# run of consecutive rows, which it walks in order, ROWS rows per step: all of a step's rows are
# loaded before the first is used (ROWS rows of reads in flight per program), then each row's
# output is made from it and the K - 1 rows before it, which stay in registers from the rows
# already walked. So each input row is read from memory once (plus K - 1 rows before each run,
# and K - 1 after it in the backward), no data moves between threads, row offsets are scalars
# (one 64-bit multiply per row, not per element), and the weight gradient is a register sum per
# program. The document of each row is followed with a scalar walk along cu_seqlens.
# Row conditions join the channel mask as tl.where(cond, cmask, False): Triton's interpreter
# types `scalar & vector` masks as integers and refuses them.


@triton.jit
def _first_document(cu_ptr, n_docs, row):
    """The document that holds row: the last d with cu[d] <= row (documents may be empty)."""
    lo = tl.program_id(0) * 0
    hi = lo + n_docs - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if tl.load(cu_ptr + mid) <= row:
            lo = mid
        else:
            hi = mid - 1
    return lo


@triton.jit
def _advance(cu_ptr, n_docs, t, doc, start, end):
    """Moves (doc, start, end) on to the document of row t (rows only grow)."""
    while (t >= end) & (doc < n_docs - 1):
        doc += 1
        start = end
        end = tl.load(cu_ptr + doc + 1)
    return doc, start, end


@triton.jit
def _tap(prev, b: tl.constexpr, t, start, doc, cache_ptr, cols, cmask, n_cols,
         K: tl.constexpr, HAS_CACHE: tl.constexpr):
    """The input b >= 1 steps before row t within its document, given prev = x[t - b]: zero
    before the document's start or, with an initial state, the state's slot."""
    inside = t - b >= start
    val = tl.where(inside, prev, 0.0)
    if HAS_CACHE:
        before = start - (t - b)  # 1 .. K-1 steps before the start reads the initial state
        c_off = doc.to(tl.int64) * n_cols * (K - 1) + cols * (K - 1) + (K - 1 - before)
        from_cache = tl.where((before >= 1) & (before <= K - 1), cmask, False)
        val += tl.load(cache_ptr + c_off, mask=from_cache, other=0.0).to(tl.float32)
    return val


@triton.jit
def _weights(w_ptr, b_ptr, cols, cmask, K: tl.constexpr, HAS_BIAS: tl.constexpr):
    """The K taps' weights of the program's channels (weight is [C, K]) and the bias, fp32."""
    w = ()
    for i in tl.static_range(K):
        w = w + (tl.load(w_ptr + cols * K + i, mask=cmask, other=0.0).to(tl.float32),)
    if HAS_BIAS:
        bias = tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    else:
        bias = tl.zeros(cols.shape, dtype=tl.float32)
    return w, bias


@triton.jit
def _rows_before(x_ptr, r0, cols, cmask, x_stride, K: tl.constexpr):
    """x[r0 - 1], x[r0 - 2], ..., x[r0 - (K-1)] (nearest first) in fp32, zero before row 0."""
    prev = ()
    for b in tl.static_range(1, K):
        row = r0 - b
        prev = prev + (tl.load(x_ptr + row.to(tl.int64) * x_stride + cols, mask=tl.where(row >= 0, cmask, False),
                               other=0.0).to(tl.float32),)
    return prev


@triton.jit
def _head_l2norm(y, eps, BLOCK_C: tl.constexpr, NORM_D: tl.constexpr):
    """y / max(||y||, eps) over each head of NORM_D consecutive channels (F.normalize)."""
    y2 = tl.reshape(y, [BLOCK_C // NORM_D, NORM_D])
    den = tl.maximum(tl.sqrt(tl.sum(y2 * y2, axis=1)), eps)
    return tl.reshape(y2 / den[:, None], [BLOCK_C])


@triton.jit
def _head_l2norm_bwd(y, dyn, eps, BLOCK_C: tl.constexpr, NORM_D: tl.constexpr):
    """The gradient of y from that of yn = y / max(||y||, eps), per head:
    (dyn - yn (yn . dyn)) / ||y|| where ||y|| > eps, dyn / eps elsewhere."""
    y2 = tl.reshape(y, [BLOCK_C // NORM_D, NORM_D])
    d2 = tl.reshape(dyn, [BLOCK_C // NORM_D, NORM_D])
    nrm = tl.sqrt(tl.sum(y2 * y2, axis=1))
    den = tl.maximum(nrm, eps)
    yn = y2 / den[:, None]
    dot = tl.where(nrm > eps, tl.sum(yn * d2, axis=1), 0.0)
    return tl.reshape((d2 - yn * dot[:, None]) / den[:, None], [BLOCK_C])


@triton.jit
def _output_piece(y_ptr, y1_ptr, y2_ptr, c0, c1, c2, n_cols, SPLIT: tl.constexpr):
    """(pointer, row width, first channel) of the output piece that holds the program's channels
    c0 .. c0 + BLOCK_C - 1: with SPLIT, channels [0, c1), [c1, c2) and [c2, n_cols) go to three
    tensors of their own (the caller makes every piece a whole number of channel blocks)."""
    if SPLIT:
        if c0 < c1:
            base, width, col0 = y_ptr, c1, 0
        elif c0 < c2:
            base, width, col0 = y1_ptr, c2 - c1, c1
        else:
            base, width, col0 = y2_ptr, n_cols - c2, c2
    else:
        base, width, col0 = y_ptr, n_cols, 0
    return base, width, col0


@triton.jit
def _fwd_step(x_ptr, y_ptr, cache_ptr, cu_ptr, xs, t0, prev, w, bias, doc, start, end, r1, n_docs, cols, cmask,
              n_cols, y_width, y_col0, normalize, eps, K: tl.constexpr, HAS_CACHE: tl.constexpr,
              IS_SILU: tl.constexpr, ROWS: tl.constexpr, INSIDE: tl.constexpr, BLOCK_C: tl.constexpr,
              NORM_D: tl.constexpr):
    """Outputs of rows t0 .. t0 + ROWS - 1 (inputs xs) into the output piece y_ptr, rows y_width
    apart, that starts at channel y_col0; L2-normalised per head of NORM_D channels where
    `normalize`. INSIDE: the caller has checked that all these rows and the K - 1 before them lie
    in one document and the rows are the program's, so no row needs a mask or a document step."""
    for j in tl.static_range(ROWS):
        t = t0 + j
        xt = xs[j].to(tl.float32)
        pre = bias + w[K - 1] * xt
        if INSIDE:
            for b in tl.static_range(1, K):
                pre += w[K - 1 - b] * prev[b - 1]
        else:
            doc, start, end = _advance(cu_ptr, n_docs, t, doc, start, end)
            for b in tl.static_range(1, K):
                pre += w[K - 1 - b] * _tap(prev[b - 1], b, t, start, doc, cache_ptr, cols, cmask, n_cols, K, HAS_CACHE)
        if IS_SILU:
            pre = pre / (1.0 + tl.exp(-pre))
        if NORM_D > 0:
            if normalize:
                pre = _head_l2norm(pre, eps, BLOCK_C, NORM_D)
        off = t.to(tl.int64) * y_width + (cols - y_col0)
        if INSIDE:
            tl.store(y_ptr + off, pre.to(y_ptr.dtype.element_ty), mask=cmask)
        else:
            tl.store(y_ptr + off, pre.to(y_ptr.dtype.element_ty), mask=tl.where(t < r1, cmask, False))
        prev = (xt,) + prev[:K - 2]
    return prev, doc, start, end


@triton.jit
def _fwd_rows(x_ptr, t0, r1, cols, cmask, x_stride, ROWS: tl.constexpr):
    """Rows t0 .. t0 + ROWS - 1 of x (zeros from row r1 on), as a tuple."""
    xs = ()
    for j in tl.static_range(ROWS):
        t = t0 + j
        xs = xs + (tl.load(x_ptr + t.to(tl.int64) * x_stride + cols, mask=tl.where(t < r1, cmask, False), other=0.0),)
    return xs


@triton.jit(do_not_specialize=["n_docs"])
def _conv_fwd_kernel(
    x_ptr, w_ptr, b_ptr, cache_ptr, cu_ptr, y_ptr, y1_ptr, y2_ptr,
    n_rows, n_cols, x_stride, n_docs, rows_per_program, c1, c2, norm_cols, eps,
    K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_CACHE: tl.constexpr, IS_SILU: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_C: tl.constexpr, SPLIT: tl.constexpr, NORM_D: tl.constexpr,
):
    # SPLIT: the output goes to three tensors (`_output_piece`); NORM_D > 0: channels below
    # norm_cols are L2-normalised per head of NORM_D after the activation.
    c0 = tl.program_id(1) * BLOCK_C
    cols = c0 + tl.arange(0, BLOCK_C)
    cmask = cols < n_cols
    y_base, y_width, y_col0 = _output_piece(y_ptr, y1_ptr, y2_ptr, c0, c1, c2, n_cols, SPLIT)
    normalize = c0 < norm_cols
    r0 = tl.program_id(0) * rows_per_program
    r1 = tl.minimum(r0 + rows_per_program, n_rows)
    w, bias = _weights(w_ptr, b_ptr, cols, cmask, K, HAS_BIAS)
    prev = _rows_before(x_ptr, r0, cols, cmask, x_stride, K)
    doc = _first_document(cu_ptr, n_docs, r0)
    start = tl.load(cu_ptr + doc)
    end = tl.load(cu_ptr + doc + 1)
    for t0 in range(r0, r1, ROWS):
        xs = _fwd_rows(x_ptr, t0, r1, cols, cmask, x_stride, ROWS)
        doc, start, end = _advance(cu_ptr, n_docs, t0, doc, start, end)
        # most steps lie inside one document: those skip the per-row masks and document walk
        if (t0 - (K - 1) >= start) & (t0 + ROWS <= end) & (t0 + ROWS <= r1):
            prev, doc, start, end = _fwd_step(x_ptr, y_base, cache_ptr, cu_ptr, xs, t0, prev, w, bias, doc, start, end,
                                              r1, n_docs, cols, cmask, n_cols, y_width, y_col0, normalize, eps, K,
                                              HAS_CACHE, IS_SILU, ROWS, True, BLOCK_C, NORM_D)
        else:
            prev, doc, start, end = _fwd_step(x_ptr, y_base, cache_ptr, cu_ptr, xs, t0, prev, w, bias, doc, start, end,
                                              r1, n_docs, cols, cmask, n_cols, y_width, y_col0, normalize, eps, K,
                                              HAS_CACHE, IS_SILU, ROWS, False, BLOCK_C, NORM_D)


@triton.jit
def _bwd_step(dx_ptr, cache_ptr, cu_ptr, xs, dys, t0, prev, pending, dw, db, w, bias, doc, start, end, r0, r1, n_docs,
              cols, cmask, n_cols, dx_stride, normalize, eps, K: tl.constexpr, HAS_CACHE: tl.constexpr,
              IS_SILU: tl.constexpr, ROWS: tl.constexpr, INSIDE: tl.constexpr, BLOCK_C: tl.constexpr,
              NORM_D: tl.constexpr):
    """Rows t0 .. t0 + ROWS - 1 of the backward walk (dx rows dx_stride apart; dys the gradients
    of the normalised outputs where `normalize`). INSIDE: the caller has checked that these
    rows and the K - 1 before them lie in one document and are all the program's own, so no
    tap, gradient share or store needs a mask and no row a document step."""
    for j in tl.static_range(ROWS):
        t = t0 + j
        xt = xs[j].to(tl.float32)
        taps = (xt,)
        if INSIDE:
            for b in tl.static_range(1, K):
                taps = taps + (prev[b - 1],)
        else:
            doc, start, end = _advance(cu_ptr, n_docs, t, doc, start, end)
            for b in tl.static_range(1, K):
                taps = taps + (_tap(prev[b - 1], b, t, start, doc, cache_ptr, cols, cmask, n_cols, K, HAS_CACHE),)
        dpre = dys[j].to(tl.float32)
        if IS_SILU or NORM_D > 0:
            pre = bias
            for b in tl.static_range(K):
                pre += w[K - 1 - b] * taps[b]
        if IS_SILU:
            sig = 1.0 / (1.0 + tl.exp(-pre))
        if NORM_D > 0:
            if normalize:
                if IS_SILU:
                    dpre = _head_l2norm_bwd(pre * sig, dpre, eps, BLOCK_C, NORM_D)
                else:
                    dpre = _head_l2norm_bwd(pre, dpre, eps, BLOCK_C, NORM_D)
        if IS_SILU:
            dpre = dpre * sig * (1.0 + pre * (1.0 - sig))
        if INSIDE:
            dpre_own = dpre
        else:
            dpre_own = tl.where(t < r1, dpre, 0.0)
        db += dpre_own
        dw_next = ()
        for i in tl.static_range(K):
            dw_next = dw_next + (dw[i] + dpre_own * taps[K - 1 - i],)
        dw = dw_next
        u = t - (K - 1)
        off = u.to(tl.int64) * dx_stride + cols
        if INSIDE:
            dx = pending[K - 2] + w[0] * dpre
            tl.store(dx_ptr + off, dx.to(dx_ptr.dtype.element_ty), mask=cmask)
            opened = (w[K - 1] * dpre,)
            for b in tl.static_range(1, K - 1):
                opened = opened + (pending[b - 1] + w[K - 1 - b] * dpre,)
        else:
            dx = pending[K - 2] + tl.where(u >= start, w[0] * dpre, 0.0)
            tl.store(dx_ptr + off, dx.to(dx_ptr.dtype.element_ty), mask=tl.where((u >= r0) & (u < r1), cmask, False))
            opened = (w[K - 1] * dpre,)
            for b in tl.static_range(1, K - 1):
                opened = opened + (pending[b - 1] + tl.where(t - b >= start, w[K - 1 - b] * dpre, 0.0),)
        pending = opened
        prev = (xt,) + prev[:K - 2]
    return prev, pending, dw, db, doc, start, end


@triton.jit
def _bwd_rows(x_ptr, dy_ptr, t0, n_rows, cols, cmask, x_stride, dy_width, dy_col0, ROWS: tl.constexpr):
    """Rows t0 .. t0 + ROWS - 1 of x and dy (zeros past the last row), as tuples; dy is the
    output piece of the program's channels (`_output_piece`)."""
    xs = ()
    dys = ()
    for j in tl.static_range(ROWS):
        t = t0 + j
        mask = tl.where(t < n_rows, cmask, False)
        xs = xs + (tl.load(x_ptr + t.to(tl.int64) * x_stride + cols, mask=mask, other=0.0),)
        dys = dys + (tl.load(dy_ptr + t.to(tl.int64) * dy_width + (cols - dy_col0), mask=mask, other=0.0),)
    return xs, dys


@triton.jit(do_not_specialize=["n_docs"])
def _conv_bwd_kernel(
    x_ptr, dy_ptr, dy1_ptr, dy2_ptr, w_ptr, b_ptr, cache_ptr, cu_ptr, dx_ptr, dw_ptr, db_ptr,
    n_rows, n_cols, x_stride, dx_stride, n_docs, rows_per_program, c1, c2, norm_cols, eps,
    K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_CACHE: tl.constexpr, IS_SILU: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_C: tl.constexpr, PREFETCH: tl.constexpr, SPLIT: tl.constexpr,
    NORM_D: tl.constexpr,
):
    # Row t's pre-activation gradient dpre[t] = dy[t] * act'(pre[t]) goes to the weight gradient,
    # dw[i] += dpre[t] * tap(K-1-i), and to dx[t - b] += w[K-1-b] * dpre[t] for each tap b that
    # lies inside t's document. The program walks its rows r0 .. r1 - 1 and K - 1 more (their
    # dpre finishes dx of its last rows); dx of row t - (K-1) is complete once row t is done, so
    # the K - 1 rows of dx still open stay in registers ("pending", nearest first).
    # SPLIT, NORM_D: the forward's (the gradient arrives in three pieces; the normalisation's
    # backward comes first, from the recomputed activation).
    pid_t = tl.program_id(0)
    c0 = tl.program_id(1) * BLOCK_C
    cols = c0 + tl.arange(0, BLOCK_C)
    cmask = cols < n_cols
    dy_base, dy_width, dy_col0 = _output_piece(dy_ptr, dy1_ptr, dy2_ptr, c0, c1, c2, n_cols, SPLIT)
    normalize = c0 < norm_cols
    r0 = pid_t * rows_per_program
    r1 = tl.minimum(r0 + rows_per_program, n_rows)
    w, bias = _weights(w_ptr, b_ptr, cols, cmask, K, HAS_BIAS)
    prev = _rows_before(x_ptr, r0, cols, cmask, x_stride, K)
    doc = _first_document(cu_ptr, n_docs, r0)
    start = tl.load(cu_ptr + doc)
    end = tl.load(cu_ptr + doc + 1)
    zero = tl.zeros([BLOCK_C], dtype=tl.float32)
    pending = ()
    for b in tl.static_range(1, K):
        pending = pending + (zero,)
    dw = ()
    for i in tl.static_range(K):
        dw = dw + (zero,)
    db = zero
    # PREFETCH: the next step's rows are loaded before this step's math, so that their loads are
    # in flight while it runs (at the cost of the registers that hold them).
    if PREFETCH:
        xs, dys = _bwd_rows(x_ptr, dy_base, r0, n_rows, cols, cmask, x_stride, dy_width, dy_col0, ROWS)
    for t0 in range(r0, r1 + K - 1, ROWS):
        if PREFETCH:
            next_xs, next_dys = _bwd_rows(x_ptr, dy_base, t0 + ROWS, n_rows, cols, cmask, x_stride, dy_width, dy_col0,
                                          ROWS)
        else:
            xs, dys = _bwd_rows(x_ptr, dy_base, t0, n_rows, cols, cmask, x_stride, dy_width, dy_col0, ROWS)
        doc, start, end = _advance(cu_ptr, n_docs, t0, doc, start, end)
        # most steps lie inside one document and the program's rows: those skip the masks
        if (t0 - (K - 1) >= start) & (t0 + ROWS <= end) & (t0 + ROWS <= r1) & (t0 - (K - 1) >= r0):
            prev, pending, dw, db, doc, start, end = _bwd_step(
                dx_ptr, cache_ptr, cu_ptr, xs, dys, t0, prev, pending, dw, db, w, bias, doc, start, end, r0, r1,
                n_docs, cols, cmask, n_cols, dx_stride, normalize, eps, K, HAS_CACHE, IS_SILU, ROWS, True,
                BLOCK_C, NORM_D)
        else:
            prev, pending, dw, db, doc, start, end = _bwd_step(
                dx_ptr, cache_ptr, cu_ptr, xs, dys, t0, prev, pending, dw, db, w, bias, doc, start, end, r0, r1,
                n_docs, cols, cmask, n_cols, dx_stride, normalize, eps, K, HAS_CACHE, IS_SILU, ROWS, False,
                BLOCK_C, NORM_D)
        if PREFETCH:
            xs, dys = next_xs, next_dys
    for i in tl.static_range(K):
        tl.store(dw_ptr + pid_t.to(tl.int64) * n_cols * K + cols * K + i, dw[i], mask=cmask)
    tl.store(db_ptr + pid_t.to(tl.int64) * n_cols + cols, db, mask=cmask)


_MAX_KERNEL = 8  # taps the kernels take (K - 1 rows of x and of dx stay in registers)
# Rows loaded per step of a program's walk, and whether the backward loads the next step's rows
# before this step's math. One H100 call (benchmarks/results/layers_h100.json, [32768, 2048]
# bf16, K = 4): forward 0.106 -> 0.103 ms of kernel time at 4 rows instead of 8 (84% -> 87% of
# copy bandwidth; 85 registers instead of 142); forward+backward 0.289 -> 0.261 ms (77% -> 85%)
# with the backward at 4 rows and prefetching (178 registers; 255 at 8 rows). Prefetching in the
# forward gave nothing (83-84%).
_FWD_ROWS, _BWD_ROWS = 4, 4
_BWD_PREFETCH = True
_THREAD_COLS = 4  # channels per thread: 8-byte (16-bit) or 16-byte (fp32) vectors


def _channel_blocks(n_cols: int) -> tuple[int, int]:
    """(BLOCK_C, warps): up to 4 warps of 4 channels per thread."""
    block = min(max(next_power_of_2(n_cols), 32), 32 * _THREAD_COLS * 4)
    return block, max(1, block // (32 * _THREAD_COLS))


def _row_runs(kernel, args, constexprs: dict, warps: int, n_rows: int, c_blocks: int, rows: int):
    """(programs along the rows, rows per program) of a one-wave grid: as many programs as fit on
    the device at once (args(rows_per_program) -> the kernel's arguments), each taking a run of
    whole steps. Runs are multiples of 16 rows, so that the kernel compiled to count registers
    is the one launched (Triton specialises integers on divisibility by 16)."""
    unit = max(rows, 16)
    resident = _num_programs(kernel, args(unit), constexprs, warps, n_tiles=1 << 30)
    programs = max(1, min(cdiv(n_rows, unit), resident // c_blocks))
    per_program = cdiv(cdiv(n_rows, programs), unit) * unit
    return cdiv(n_rows, per_program), per_program


def _cu_of(x: torch.Tensor, cu_seqlens: torch.Tensor | None) -> torch.Tensor:
    """Document boundaries over the flattened rows, int32 (each batch row is a document)."""
    b, t, _ = x.shape
    if cu_seqlens is None:
        if t == 0:
            return torch.zeros(b + 1, device=x.device, dtype=torch.int32)
        return torch.arange(0, (b + 1) * t, t, device=x.device, dtype=torch.int32)
    return cu_seqlens.to(torch.int32)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as [rows, C] with unit channel stride; the rows may be further apart than C (x a slice
    of the channels of a wider projection output is read in place, not copied)."""
    xf = x.reshape(-1, x.shape[-1])
    return xf if xf.stride(-1) == 1 else xf.contiguous()


def _launch_fwd(xf, w, bias, cache, cu, outs, block, warps, activation, c1=0, c2=0, norm_cols=0, norm_dim=0,
                eps=0.0):
    """The forward kernel over xf [rows, C] (rows may be further apart than C) into outs: one
    [rows, C] tensor, or three pieces split at channels c1 and c2 (`_output_piece`)."""
    n_rows, n_cols = xf.shape
    split = len(outs) == 3
    y, y1, y2 = outs if split else (outs[0],) * 3
    constexprs = dict(K=w.shape[-1], HAS_BIAS=bias is not None, HAS_CACHE=cache is not None,
                      IS_SILU=activation == "silu", ROWS=_FWD_ROWS, BLOCK_C=block, SPLIT=split, NORM_D=norm_dim)

    def args(rows_per_program):
        return (xf, w, bias if bias is not None else w, cache if cache is not None else xf, cu, y, y1, y2,
                n_rows, n_cols, xf.stride(0), cu.shape[0] - 1, rows_per_program, c1, c2, norm_cols, eps)

    c_blocks = cdiv(n_cols, block)
    programs_t, per_program = _row_runs(_conv_fwd_kernel, args, constexprs, warps, n_rows, c_blocks, _FWD_ROWS)
    _conv_fwd_kernel[(programs_t, c_blocks)](*args(per_program), **constexprs, num_warps=warps)


def _launch_bwd(xf, dys, w, bias, cache, cu, dx, block, warps, activation, c1=0, c2=0, norm_cols=0, norm_dim=0,
                eps=0.0):
    """The backward kernel: dx [rows, >= C] (its first C channels) and (dw, db) in fp32, from
    the output gradient dys (as the forward's outs)."""
    n_rows, n_cols = xf.shape
    split = len(dys) == 3
    dy, dy1, dy2 = dys if split else (dys[0],) * 3
    constexprs = dict(K=w.shape[-1], HAS_BIAS=bias is not None, HAS_CACHE=cache is not None,
                      IS_SILU=activation == "silu", ROWS=_BWD_ROWS, BLOCK_C=block, PREFETCH=_BWD_PREFETCH,
                      SPLIT=split, NORM_D=norm_dim)

    def args(dw_partial, db_partial, rows_per_program):
        return (xf, dy, dy1, dy2, w, bias if bias is not None else w, cache if cache is not None else xf, cu,
                dx, dw_partial, db_partial, n_rows, n_cols, xf.stride(0), dx.stride(0), cu.shape[0] - 1,
                rows_per_program, c1, c2, norm_cols, eps)

    c_blocks = cdiv(n_cols, block)
    scratch = xf.new_empty(0, dtype=torch.float32)
    programs_t, per_program = _row_runs(_conv_bwd_kernel, lambda rows: args(scratch, scratch, rows), constexprs,
                                        warps, n_rows, c_blocks, _BWD_ROWS)
    dw_partial = torch.empty(programs_t, n_cols, w.shape[-1], device=xf.device, dtype=torch.float32)
    db_partial = torch.empty(programs_t, n_cols, device=xf.device, dtype=torch.float32)
    _conv_bwd_kernel[(programs_t, c_blocks)](*args(dw_partial, db_partial, per_program), **constexprs,
                                             num_warps=warps)
    return dw_partial.sum(0), db_partial.sum(0)


def _conv_fwd_impl(x, weight, bias, cu, initial_state, activation):
    xf = _rows(x)
    n_rows, n_cols = xf.shape
    y = torch.empty(n_rows, n_cols, dtype=x.dtype, device=x.device)
    if n_rows == 0:
        return y.view(x.shape)
    cache = initial_state.contiguous() if initial_state is not None else None
    block, warps = _channel_blocks(n_cols)
    _launch_fwd(xf, weight.contiguous(), bias, cache, cu, [y], block, warps, activation)
    return y.view(x.shape)


def _conv_bwd_impl(dy, x, weight, bias, cu, initial_state, activation):
    n_cols = x.shape[-1]
    k = weight.shape[-1]
    xf = _rows(x)
    dyf = dy.reshape(-1, n_cols).contiguous()
    n_rows = xf.shape[0]
    w = weight.contiguous()
    cache = initial_state.contiguous() if initial_state is not None else None
    dx = torch.empty(n_rows, n_cols, dtype=x.dtype, device=x.device)
    if n_rows == 0:
        dw = torch.zeros(n_cols, k, device=x.device, dtype=torch.float32)
        db = torch.zeros(n_cols, device=x.device, dtype=torch.float32)
    else:
        block, warps = _channel_blocks(n_cols)
        dw, db = _launch_bwd(xf, [dyf], w, bias, cache, cu, dx, block, warps, activation)
    if initial_state is not None:
        d_state = _initial_state_grad(dyf, xf, w, bias, cache, cu, activation)
    else:
        d_state = x.new_empty(0)
    return dx.view(x.shape), dw.to(weight.dtype), db, d_state


def _initial_state_grad(dyf, xf, weight, bias, cache, cu, activation):
    """Tap i of token start+j reads K-1-i-j steps before the start, which is cache slot i+j, so
    d cache[n, c, m] = sum over i + j = m of w[c, i] * dpre[start_n + j]; the few dpre needed
    (the first K-1 tokens of each document) are recomputed here in torch."""
    k = weight.shape[-1]
    if xf.shape[0] == 0:  # no token reads the state
        return xf.new_zeros(cu.shape[0] - 1, xf.shape[1], k - 1)
    starts, ends = cu[:-1].long(), cu[1:].long()
    docs = torch.arange(starts.shape[0], device=xf.device)
    w = weight.float()
    xs, cs = xf.float(), cache.float()
    grad = xs.new_zeros(starts.shape[0], xs.shape[1], k - 1)
    for j in range(k - 1):
        pos = starts + j
        valid = (pos < ends)[:, None]
        pre = sum(_input_at(xs, cs, docs, starts, pos - (k - 1 - i), k) * w[:, i] for i in range(k))
        if bias is not None:
            pre = pre + bias.float()
        dpre = dyf[pos.clamp(max=xs.shape[0] - 1)].float() * valid
        if activation == "silu":
            sig = torch.sigmoid(pre)
            dpre = dpre * sig * (1 + pre * (1 - sig))
        for i in range(k - 1 - j):
            grad[:, :, i + j] += dpre * w[:, i]
    return grad.to(xf.dtype)


@torch.library.custom_op("flame::causal_conv1d_fwd", mutates_args=(), tags=ROW_STRIDED_OP_TAGS)
def _conv_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, cu: torch.Tensor,
              initial_state: torch.Tensor | None, activation: str) -> torch.Tensor:
    return _conv_fwd_impl(x, weight, bias, cu, initial_state, activation)


@_conv_fwd.register_fake
def _(x, weight, bias, cu, initial_state, activation):
    return x.new_empty(x.shape)  # contiguous, whatever x's row stride


@torch.library.custom_op("flame::causal_conv1d_bwd", mutates_args=(), tags=ROW_STRIDED_OP_TAGS)
def _conv_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
              cu: torch.Tensor, initial_state: torch.Tensor | None, activation: str
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _conv_bwd_impl(dy, x, weight, bias, cu, initial_state, activation)


@_conv_bwd.register_fake
def _(dy, x, weight, bias, cu, initial_state, activation):
    d_state = torch.empty_like(initial_state, dtype=x.dtype) if initial_state is not None else x.new_empty(0)
    return (x.new_empty(x.shape), torch.empty_like(weight),
            x.new_empty(x.shape[-1], dtype=torch.float32), d_state)


def _conv_setup(ctx, inputs, output):
    x, weight, bias, cu, initial_state, activation = inputs
    ctx.activation = activation
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, weight, bias, cu, initial_state)


def _conv_grads(ctx, dx, dw, db, d_state):
    initial_state = ctx.saved_tensors[-1]
    return (dx, dw, db.to(ctx.saved_tensors[2].dtype) if ctx.has_bias else None, None,
            d_state.to(initial_state.dtype) if initial_state is not None else None, None)


def _conv_backward(ctx, dy):
    x, weight, bias, cu, initial_state = ctx.saved_tensors
    return _conv_grads(ctx, *_conv_bwd(dy, x, weight, bias, cu, initial_state, ctx.activation))


_conv_fwd.register_autograd(_conv_backward, setup_context=_conv_setup)


class _CausalConv1d(torch.autograd.Function):
    """The same forward and backward as the custom ops, for eager mode: an autograd.Function
    costs the host a fraction of a custom op's dispatch (tens of microseconds per call), which
    matters at these kernels' sub-millisecond times. torch.compile traces the custom ops."""

    @staticmethod
    def forward(ctx, x, weight, bias, cu, initial_state, activation):
        y = _conv_fwd_impl(x, weight, bias, cu, initial_state, activation)
        _conv_setup(ctx, (x, weight, bias, cu, initial_state, activation), y)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, cu, initial_state = ctx.saved_tensors
        return _conv_grads(ctx, *_conv_bwd_impl(dy, x, weight, bias, cu, initial_state, ctx.activation))


# ----------------------------------------------------------------------------- public functions


def _check_conv_inputs(x, weight, bias, activation, cu_seqlens, initial_state):
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation={activation!r} is not one of {ACTIVATIONS}")
    if x.dim() != 3:
        raise ValueError(f"x has shape {tuple(x.shape)}; the convolution needs [B, T, C]")
    if weight.dim() != 2 or weight.shape[0] != x.shape[-1] or weight.shape[1] < 2:
        raise ValueError(
            f"weight has shape {tuple(weight.shape)}; it must be [C={x.shape[-1]}, kernel_size >= 2]"
        )
    if bias is not None and bias.shape != (x.shape[-1],):
        raise ValueError(f"bias has shape {tuple(bias.shape)}; it must be [C={x.shape[-1]}]")
    if cu_seqlens is not None and x.shape[0] != 1:
        raise ValueError(f"with cu_seqlens, x must be [1, L, C] (got batch {x.shape[0]}); flatten the batch")
    n = x.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    want = (n, x.shape[-1], weight.shape[1] - 1)
    if initial_state is not None and tuple(initial_state.shape) != want:
        raise ValueError(f"initial_state has shape {tuple(initial_state.shape)}; it must be {want}")


def causal_conv1d(x, weight, bias=None, activation="silu", cu_seqlens=None, initial_state=None,
                  output_final_state=False):
    """x [B, T, C], weight [C, K] -> (y [B, T, C], final_state [N, C, K-1] or None)."""
    _check_conv_inputs(x, weight, bias, activation, cu_seqlens, initial_state)
    # the kernels keep K - 1 rows of inputs and of dx in registers; wider kernels than short
    # convolutions use torch
    if not use_triton(x, weight) or weight.shape[-1] > _MAX_KERNEL:
        return causal_conv1d_ref(x, weight, bias, activation, cu_seqlens, initial_state, output_final_state)
    cu = _cu_of(x, cu_seqlens)
    if torch.compiler.is_compiling():
        y = _conv_fwd(x, weight, bias, cu, initial_state, activation or "none")
    else:
        y = _CausalConv1d.apply(x, weight, bias, cu, initial_state, activation or "none")
    final = None
    if output_final_state:
        k = weight.shape[-1]
        xf, cu64 = x.reshape(-1, x.shape[-1]), cu.long()
        starts, ends = cu64[:-1], cu64[1:]
        docs = torch.arange(starts.shape[0], device=x.device)
        final = torch.stack(
            [_input_at(xf, initial_state, docs, starts, ends - (k - 1 - i), k) for i in range(k - 1)], dim=-1
        )
    return y, final


# ----------------------------------------------------------------------------- q, k, v of one projection


def l2_normalize_heads(x: torch.Tensor, head_dim: int, eps: float) -> torch.Tensor:
    """x [..., C] / max(||.||, eps) over each head of head_dim consecutive channels (torch)."""
    return F.normalize(x.unflatten(-1, (-1, head_dim)), dim=-1, eps=eps).flatten(-2)


def _qkv_launch(widths: tuple[int, ...], norm_dim: int):
    """(BLOCK_C, warps, c1, c2, norm_cols) of the split convolution, or None where the kernels
    cannot take it: every piece a whole number of channel blocks (so that a program writes one
    piece), and the normalised heads whole inside a block (a power-of-two head size). c1, c2:
    where k and v start; norm_cols: the channels normalised (q and k, or none)."""
    block, _ = _channel_blocks(sum(widths))
    while block > 1 and any(w % block for w in widths):
        block //= 2
    if norm_dim and (block < norm_dim or block % norm_dim):
        return None
    c1, c2 = widths[0], widths[0] + widths[1]
    return block, max(1, block // (32 * _THREAD_COLS)), c1, c2, c2 if norm_dim else 0


def _qkv_fwd_impl(x, weight, bias, cu, widths, norm_dim, eps, activation):
    c = sum(widths)
    xf = x.reshape(-1, x.shape[-1])
    n_rows = xf.shape[0]
    outs = [torch.empty(n_rows, width, dtype=x.dtype, device=x.device) for width in widths]
    if n_rows:
        block, warps, c1, c2, norm_cols = _qkv_launch(tuple(widths), norm_dim)
        _launch_fwd(xf[:, :c], weight.contiguous(), bias, None, cu, outs, block, warps, activation,
                    c1, c2, norm_cols, norm_dim, eps)
    # the projection's other channels (narrow gates), as a tensor of their own (outputs of a
    # custom op may not alias its inputs, so always a copy)
    rest = torch.empty(n_rows, x.shape[-1] - c, dtype=x.dtype, device=x.device)
    rest.copy_(xf[:, c:])
    return tuple(t.view(*x.shape[:-1], t.shape[-1]) for t in outs + [rest])


def _qkv_bwd_impl(dq, dk, dv, drest, x, weight, bias, cu, widths, norm_dim, eps, activation):
    c = sum(widths)
    xf = x.reshape(-1, x.shape[-1])
    n_rows = xf.shape[0]
    dx = torch.empty(n_rows, x.shape[-1], dtype=x.dtype, device=x.device)
    if n_rows:
        block, warps, c1, c2, norm_cols = _qkv_launch(tuple(widths), norm_dim)
        dys = [d.reshape(n_rows, width).contiguous() for d, width in zip((dq, dk, dv), widths)]
        dw, db = _launch_bwd(xf[:, :c], dys, weight.contiguous(), bias, None, cu, dx, block, warps, activation,
                             c1, c2, norm_cols, norm_dim, eps)
    else:
        dw = torch.zeros(c, weight.shape[-1], device=x.device, dtype=torch.float32)
        db = torch.zeros(c, device=x.device, dtype=torch.float32)
    dx[:, c:] = drest.reshape(n_rows, -1)
    return dx.view(x.shape), dw.to(weight.dtype), db


@torch.library.custom_op("flame::conv_qkv_fwd", mutates_args=())
def _qkv_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, cu: torch.Tensor, widths: list[int],
             norm_dim: int, eps: float, activation: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _qkv_fwd_impl(x, weight, bias, cu, widths, norm_dim, eps, activation)


@_qkv_fwd.register_fake
def _(x, weight, bias, cu, widths, norm_dim, eps, activation):
    lead = x.shape[:-1]
    return tuple(x.new_empty(*lead, width) for width in list(widths) + [x.shape[-1] - sum(widths)])


@torch.library.custom_op("flame::conv_qkv_bwd", mutates_args=())
def _qkv_bwd(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, drest: torch.Tensor, x: torch.Tensor,
             weight: torch.Tensor, bias: torch.Tensor | None, cu: torch.Tensor, widths: list[int], norm_dim: int,
             eps: float, activation: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _qkv_bwd_impl(dq, dk, dv, drest, x, weight, bias, cu, widths, norm_dim, eps, activation)


@_qkv_bwd.register_fake
def _(dq, dk, dv, drest, x, weight, bias, cu, widths, norm_dim, eps, activation):
    return x.new_empty(x.shape), torch.empty_like(weight), x.new_empty(sum(widths), dtype=torch.float32)


def _qkv_setup(ctx, inputs, output):
    x, weight, bias, cu, widths, norm_dim, eps, activation = inputs
    ctx.options = (list(widths), norm_dim, eps, activation)
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, weight, bias, cu)


def _qkv_grads(ctx, dq, dk, dv, drest):
    """Zeros for outputs the loss did not reach (autograd passes None for them)."""
    x = ctx.saved_tensors[0]
    widths = ctx.options[0]
    lead = x.shape[:-1]
    grads = [g if g is not None else x.new_zeros(*lead, width)
             for g, width in zip((dq, dk, dv, drest), widths + [x.shape[-1] - sum(widths)])]
    return grads


def _qkv_backward_by(bwd, ctx, dq, dk, dv, drest):
    """The autograd backward through bwd: the custom op under compile, its implementation eagerly."""
    x, weight, bias, cu = ctx.saved_tensors
    dx, dw, db = bwd(*_qkv_grads(ctx, dq, dk, dv, drest), x, weight, bias, cu, *ctx.options)
    return dx, dw, db.to(bias.dtype) if ctx.has_bias else None, None, None, None, None, None


def _qkv_backward(ctx, dq, dk, dv, drest):
    return _qkv_backward_by(_qkv_bwd, ctx, dq, dk, dv, drest)


_qkv_fwd.register_autograd(_qkv_backward, setup_context=_qkv_setup)


class _ConvQKV(torch.autograd.Function):
    """The custom ops' forward and backward for eager mode (as _CausalConv1d)."""

    @staticmethod
    def forward(ctx, x, weight, bias, cu, widths, norm_dim, eps, activation):
        out = _qkv_fwd_impl(x, weight, bias, cu, widths, norm_dim, eps, activation)
        _qkv_setup(ctx, (x, weight, bias, cu, widths, norm_dim, eps, activation), out)
        return out

    @staticmethod
    def backward(ctx, dq, dk, dv, drest):
        return _qkv_backward_by(_qkv_bwd_impl, ctx, dq, dk, dv, drest)


def causal_conv1d_qkv(x, weight, bias=None, activation="silu", cu_seqlens=None, widths=(), qk_norm_dim=None,
                      eps=1e-6):
    """The short convolution of a fused q, k, v projection, for training (no decoding caches).

    x [B, T, C + R]: the projection's output, whose first C = sum(widths) channels are q, k and v
    side by side (widths (Cq, Ck, Cv)) and whose last R are other projections (narrow gates);
    weight [C, kernel_size]. Returns (q, k, v, rest): the convolution's output split into the
    three pieces, each a tensor of its own, and x[..., C:]. With qk_norm_dim, q and k are
    L2-normalised over heads of that many channels after the activation (F.normalize, eps).

    On the Triton path one kernel writes the three pieces and normalises q and k, and its
    backward reads their gradients where they lie and writes x's whole gradient, rest included:
    the splits, normalisations and concatenations around a plain convolution cost a memory
    round trip each, forward and backward."""
    widths = [int(w) for w in widths]
    c = sum(widths)
    if len(widths) != 3 or min(widths) <= 0:
        raise ValueError(f"widths={widths}: q, k and v need three positive channel counts")
    if x.dim() != 3 or x.shape[-1] < c:
        raise ValueError(f"x has shape {tuple(x.shape)}; it must be [B, T, >= {c}] (q, k, v channels {widths})")
    if qk_norm_dim is not None and (qk_norm_dim <= 0 or widths[0] % qk_norm_dim or widths[1] % qk_norm_dim):
        raise ValueError(f"qk_norm_dim={qk_norm_dim} must divide the q and k widths {widths[:2]}")
    _check_conv_inputs(x[..., :c], weight, bias, activation, cu_seqlens, None)
    norm_dim = qk_norm_dim or 0
    fits = (use_triton(x, weight) and weight.shape[-1] <= _MAX_KERNEL and x.stride(-1) == 1
            and _qkv_launch(tuple(widths), norm_dim) is not None)
    if not fits:
        y, _ = causal_conv1d(x[..., :c], weight, bias, activation, cu_seqlens)
        q, k, v = y.split(widths, dim=-1)
        if qk_norm_dim:
            q, k = l2_normalize_heads(q, qk_norm_dim, eps), l2_normalize_heads(k, qk_norm_dim, eps)
        return q, k, v, x[..., c:]
    cu = _cu_of(x, cu_seqlens)
    x = x if x.is_contiguous() else x.contiguous()
    if torch.compiler.is_compiling():
        return _qkv_fwd(x, weight, bias, cu, widths, norm_dim, eps, activation or "none")
    return _ConvQKV.apply(x, weight, bias, cu, widths, norm_dim, eps, activation or "none")


def causal_conv1d_step(x, cache, weight, bias=None, activation="silu"):
    """One decoding step: x [N, C], cache [N, C, K-1] -> (y [N, C], new cache). Small; plain torch."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation={activation!r} is not one of {ACTIVATIONS}")
    want = (x.shape[0], x.shape[1], weight.shape[-1] - 1)
    if x.dim() != 2 or tuple(cache.shape) != want:
        raise ValueError(f"x must be [N, C] and cache {want}; got x {tuple(x.shape)}, cache {tuple(cache.shape)}")
    return causal_conv1d_step_ref(x, cache, weight, bias, activation)
