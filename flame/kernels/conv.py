"""Short causal depthwise convolution over [B, T, C] with packed documents, and its decode step.

    y[t, c] = act(bias[c] + sum_k weight[c, k] * x[t - (K-1) + k, c]),   act = silu or none

A tap that reaches before the start of its document reads the document's initial state (the
last K-1 inputs of what came before, `cache[n, c, K-1-i]` holding the input i steps back) or
zero, so packed documents never see each other. The final state holds the last K-1 inputs of
each document (oldest first). With cu_seqlens, x is [1, L, C] and documents are
cu_seqlens[n]:cu_seqlens[n+1]; without it, each of the B rows is a document.
"""

import torch
import triton
import triton.language as tl

from flame.kernels.dispatch import use_triton

ACTIVATIONS = ("silu", None)


def _documents(x: torch.Tensor, cu_seqlens: torch.Tensor | None):
    """Flattened x [L, C], cu_seqlens [N+1] (int64), and per token its document and start."""
    b, t, c = x.shape
    if cu_seqlens is None:
        cu = torch.arange(0, (b + 1) * t, t, device=x.device, dtype=torch.int64)
    else:
        cu = cu_seqlens.to(torch.int64)
    positions = torch.arange(b * t, device=x.device)
    doc = torch.searchsorted(cu[1:], positions, right=True)
    return x.reshape(b * t, c), cu, doc, cu[doc]


def _input_at(xf, cache, doc, start, src, k):
    """Input at flattened position src (a tensor of the same shape as doc), for each token's
    document: x itself inside the document, the initial state before it, zero beyond that."""
    inside = src >= start
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


# Tiles are [BLOCK_T rows, BLOCK_C channels] with channels contiguous (coalesced, 16-byte
# vectors). Each tile reads its rows of x (and dy) from memory once; the shifted rows that the K
# taps need are taken from the tile itself with gathers along the rows (register shuffles, not
# memory reads), so a tile's first K - 1 rows are halo: read, never written. The weight is passed
# as [K, C] so that each tap's weights load as contiguous vectors.


@triton.jit
def _shift(t, s: tl.constexpr, BLOCK_T: tl.constexpr):
    """Row q of the result is row q - s of t (s may be negative), clamped to the tile; callers
    only use rows whose source lies inside it."""
    if s == 0:
        return t
    q = tl.arange(0, BLOCK_T)
    idx = tl.minimum(tl.maximum(q - s, 0), BLOCK_T - 1)
    return tl.gather(t, tl.broadcast_to(idx[:, None], t.shape), 0)


@triton.jit
def _tap(xt, cache_ptr, back: tl.constexpr, rows, start, doc, cols, cmask, n_cols, tmask,
         K: tl.constexpr, HAS_CACHE: tl.constexpr, BLOCK_T: tl.constexpr):
    """The input `back` steps before each row, within the row's document: from the tile xt, from
    the initial state for the first K - 1 - back rows of a document, else zero."""
    inside = rows - back >= start
    val = tl.where(inside[:, None], _shift(xt, back, BLOCK_T), 0.0)
    if HAS_CACHE:
        before = start - (rows - back)  # 1 .. K-1 steps before the start reads the initial state
        from_cache = tmask & (~inside) & (before <= K - 1)
        c_off = doc.to(tl.int64)[:, None] * (n_cols * (K - 1)) + cols[None, :] * (K - 1) + (K - 1 - before)[:, None]
        val += tl.load(cache_ptr + c_off, mask=from_cache[:, None] & cmask[None, :], other=0.0).to(tl.float32)
    return val


@triton.jit
def _conv_pre(xt, wt_ptr, b_ptr, cache_ptr, rows, start, doc, cols, cmask, n_cols, tmask,
              K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_CACHE: tl.constexpr, BLOCK_T: tl.constexpr):
    """Pre-activation (fp32) at the tile's rows from q = K - 1 on (earlier rows lack their taps)."""
    acc = tl.zeros(xt.shape, dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    for i in tl.static_range(K):
        w = tl.load(wt_ptr + i * n_cols + cols, mask=cmask, other=0.0).to(tl.float32)
        acc += w[None, :] * _tap(xt, cache_ptr, K - 1 - i, rows, start, doc, cols, cmask, n_cols, tmask,
                                 K, HAS_CACHE, BLOCK_T)
    return acc


@triton.jit
def _load_tile(ptr, rows, cols, cmask, n_rows, n_cols):
    """Rows of a [n_rows, n_cols] tensor as fp32, zero outside it, and the row mask."""
    tmask = (rows >= 0) & (rows < n_rows)
    off = rows.to(tl.int64)[:, None] * n_cols + cols[None, :]
    return tl.load(ptr + off, mask=tmask[:, None] & cmask[None, :], other=0.0).to(tl.float32), tmask


@triton.jit
def _load_raw(x_ptr, dy_ptr, rows, cols, cmask, n_rows, n_cols):
    """Rows of x and dy in their own dtype, zero outside the tensors, and the row mask."""
    tmask = (rows >= 0) & (rows < n_rows)
    off = rows.to(tl.int64)[:, None] * n_cols + cols[None, :]
    mask = tmask[:, None] & cmask[None, :]
    return tl.load(x_ptr + off, mask=mask, other=0.0), tl.load(dy_ptr + off, mask=mask, other=0.0), tmask


@triton.jit
def _conv_fwd_kernel(
    x_ptr, wt_ptr, b_ptr, cache_ptr, doc_ptr, cu_ptr, y_ptr,
    n_rows, n_cols,
    K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_CACHE: tl.constexpr, IS_SILU: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # the tile's first K - 1 rows are halo; it writes the BLOCK_T - (K - 1) rows after them
    q = tl.arange(0, BLOCK_T)
    rows = tl.program_id(0) * (BLOCK_T - (K - 1)) - (K - 1) + q
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < n_cols
    xt, tmask = _load_tile(x_ptr, rows, cols, cmask, n_rows, n_cols)
    doc = tl.load(doc_ptr + rows, mask=tmask, other=0)
    start = tl.load(cu_ptr + doc, mask=tmask, other=0)
    y = _conv_pre(xt, wt_ptr, b_ptr, cache_ptr, rows, start, doc, cols, cmask, n_cols, tmask,
                  K, HAS_BIAS, HAS_CACHE, BLOCK_T)
    if IS_SILU:
        y = y / (1.0 + tl.exp(-y))
    own = tmask & (q >= K - 1)
    off = rows.to(tl.int64)[:, None] * n_cols + cols[None, :]
    tl.store(y_ptr + off, y.to(y_ptr.dtype.element_ty), mask=own[:, None] & cmask[None, :])


@triton.jit
def _conv_bwd_kernel(
    x_ptr, dy_ptr, wt_ptr, b_ptr, cache_ptr, doc_ptr, cu_ptr, dx_ptr, dw_ptr, db_ptr,
    n_rows, n_cols, tiles_per_program,
    K: tl.constexpr, K_POW2: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_CACHE: tl.constexpr,
    IS_SILU: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # A tile of BLOCK_T rows recomputes the pre-activation gradient dpre from its x and dy (rows
    # from q = K - 1 on have all their taps) and writes dx for the OUT = BLOCK_T - 2(K - 1) rows
    # q = K - 1 .. K - 2 + OUT, since dx[t] = sum_s w[K-1-s] dpre[t + s] over t + s in t's
    # document needs dpre K - 1 rows ahead. Those rows also own their share of
    # dw[i] = sum_t dpre[t] x[t - (K-1-i)] and db = sum_t dpre[t]. Each program walks
    # tiles_per_program consecutive tiles of one channel block (neighbouring halos are still in
    # cache) and keeps its partial dw, db in registers, written once as [programs, K, C].
    OUT: tl.constexpr = BLOCK_T - 2 * (K - 1)
    pid_t = tl.program_id(0)
    q = tl.arange(0, BLOCK_T)
    kk = tl.arange(0, K_POW2)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < n_cols
    dw = tl.zeros([K_POW2, BLOCK_C], dtype=tl.float32)
    db = tl.zeros([BLOCK_C], dtype=tl.float32)
    # the next tile's x and dy are loaded before this tile is worked on, so that two tiles of
    # reads are in flight per program
    rows = pid_t * tiles_per_program * OUT - (K - 1) + q
    x_raw, dy_raw, tmask = _load_raw(x_ptr, dy_ptr, rows, cols, cmask, n_rows, n_cols)
    for j in range(tiles_per_program):
        rows_next = rows + OUT
        x_next, dy_next, tmask_next = _load_raw(x_ptr, dy_ptr, rows_next, cols, cmask, n_rows, n_cols)
        xt = x_raw.to(tl.float32)
        dy = dy_raw.to(tl.float32)
        doc = tl.load(doc_ptr + rows, mask=tmask, other=0)
        start = tl.load(cu_ptr + doc, mask=tmask, other=0)
        end = tl.load(cu_ptr + doc + 1, mask=tmask, other=0)
        dpre = dy
        if IS_SILU:
            pre = _conv_pre(xt, wt_ptr, b_ptr, cache_ptr, rows, start, doc, cols, cmask, n_cols, tmask,
                            K, HAS_BIAS, HAS_CACHE, BLOCK_T)
            sig = 1.0 / (1.0 + tl.exp(-pre))
            dpre = dy * sig * (1.0 + pre * (1.0 - sig))
        own = tmask & (q >= K - 1) & (q < K - 1 + OUT)
        # the weight gradient first, so that the shifted inputs die before dpre is shifted
        dpre_own = tl.where(own[:, None], dpre, 0.0)
        for i in tl.static_range(K):
            xs = _tap(xt, cache_ptr, K - 1 - i, rows, start, doc, cols, cmask, n_cols, tmask, K, HAS_CACHE, BLOCK_T)
            dw += tl.where(kk[:, None] == i, tl.sum(dpre_own * xs, axis=0)[None, :], 0.0)
        db += tl.sum(dpre_own, axis=0)
        dx = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)
        for s in tl.static_range(K):
            w = tl.load(wt_ptr + (K - 1 - s) * n_cols + cols, mask=cmask, other=0.0).to(tl.float32)
            ahead = tl.where((rows + s < end)[:, None], _shift(dpre, -s, BLOCK_T), 0.0)
            dx += w[None, :] * ahead
        off = rows.to(tl.int64)[:, None] * n_cols + cols[None, :]
        tl.store(dx_ptr + off, dx.to(dx_ptr.dtype.element_ty), mask=own[:, None] & cmask[None, :])
        rows, x_raw, dy_raw, tmask = rows_next, x_next, dy_next, tmask_next
    dw_off = pid_t * K * n_cols + kk[:, None] * n_cols + cols[None, :]
    tl.store(dw_ptr + dw_off, dw, mask=(kk[:, None] < K) & cmask[None, :])
    tl.store(db_ptr + pid_t * n_cols + cols, db, mask=cmask)


_BLOCK_T, _BLOCK_C, _WARPS = 64, 64, 8  # forward tiles
_BWD_BLOCK_T = 32  # backward tiles: fewer rows, as each keeps about ten fp32 copies in registers


def _bwd_grid(x: torch.Tensor, n_rows: int, n_cols: int, k: int) -> tuple[int, int, int]:
    """(programs along T, channel blocks, tiles per program) of the persistent backward."""
    tiles = triton.cdiv(n_rows, _BWD_BLOCK_T - 2 * (k - 1))
    c_blocks = triton.cdiv(n_cols, _BLOCK_C)
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 1
    # two programs per SM fit (128 registers, 8 warps); never more than fit, or a second wave
    # of a few programs would double the time
    programs_t = max(1, min(tiles, (2 * sms) // c_blocks))
    per_program = max(1, triton.cdiv(tiles, programs_t))
    return triton.cdiv(tiles, per_program), c_blocks, per_program


def _doc_index(n_rows: int, cu: torch.Tensor) -> torch.Tensor:
    return torch.searchsorted(cu[1:], torch.arange(n_rows, device=cu.device), right=True).to(torch.int32)


@torch.library.custom_op("flame::causal_conv1d_fwd", mutates_args=())
def _conv_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, cu: torch.Tensor,
              initial_state: torch.Tensor | None, activation: str) -> torch.Tensor:
    xf = x.reshape(-1, x.shape[-1]).contiguous()
    n_rows, n_cols = xf.shape
    y = torch.empty_like(xf)
    cache = initial_state.contiguous() if initial_state is not None else None
    k = weight.shape[-1]
    grid = (triton.cdiv(n_rows, _BLOCK_T - (k - 1)), triton.cdiv(n_cols, _BLOCK_C))
    _conv_fwd_kernel[grid](
        xf, weight.t().contiguous(), bias if bias is not None else xf, cache if cache is not None else xf,
        _doc_index(n_rows, cu), cu, y, n_rows, n_cols,
        K=k, HAS_BIAS=bias is not None, HAS_CACHE=cache is not None,
        IS_SILU=activation == "silu", BLOCK_T=_BLOCK_T, BLOCK_C=_BLOCK_C, num_warps=_WARPS,
        # 16-bit inputs with K <= 4, no bias and no initial state fit 64 registers without spills
        # (ptxas for sm_90; 73-80 uncapped), so 4 programs share an SM instead of 3
        **({"maxnreg": 64} if xf.element_size() == 2 and k <= 4 and bias is None and cache is None else {}),
    )
    return y.view_as(x)


@_conv_fwd.register_fake
def _(x, weight, bias, cu, initial_state, activation):
    return torch.empty_like(x)


@torch.library.custom_op("flame::causal_conv1d_bwd", mutates_args=())
def _conv_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
              cu: torch.Tensor, initial_state: torch.Tensor | None, activation: str
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    n_cols = x.shape[-1]
    k = weight.shape[-1]
    xf = x.reshape(-1, n_cols).contiguous()
    dyf = dy.reshape(-1, n_cols).contiguous()
    n_rows = xf.shape[0]
    w = weight.contiguous()
    cache = initial_state.contiguous() if initial_state is not None else None
    programs_t, c_blocks, per_program = _bwd_grid(xf, n_rows, n_cols, k)
    dx = torch.empty_like(xf)
    dw = torch.empty(programs_t, k, n_cols, device=x.device, dtype=torch.float32)
    db = torch.empty(programs_t, n_cols, device=x.device, dtype=torch.float32)
    _conv_bwd_kernel[(programs_t, c_blocks)](
        xf, dyf, w.t().contiguous(), bias if bias is not None else xf, cache if cache is not None else xf,
        _doc_index(n_rows, cu), cu, dx, dw, db, n_rows, n_cols, per_program,
        K=k, K_POW2=triton.next_power_of_2(k), HAS_BIAS=bias is not None, HAS_CACHE=cache is not None,
        IS_SILU=activation == "silu", BLOCK_T=_BWD_BLOCK_T, BLOCK_C=_BLOCK_C, num_warps=_WARPS,
        # 16-bit inputs with K <= 4 and no initial state fit 128 registers (ptxas for sm_90: no
        # spills, 16 bytes with both bias and silu), which lets two programs share an SM; other
        # variants would spill more
        **({"maxnreg": 128} if xf.element_size() == 2 and k <= 4 and cache is None else {}),
    )
    if initial_state is not None:
        d_state = _initial_state_grad(dyf, xf, w, bias, cache, cu, activation)
    else:
        d_state = x.new_empty(0)
    return dx.view_as(x), dw.sum(0).t().contiguous().to(weight.dtype), db.sum(0), d_state


@_conv_bwd.register_fake
def _(dy, x, weight, bias, cu, initial_state, activation):
    d_state = torch.empty_like(initial_state, dtype=x.dtype) if initial_state is not None else x.new_empty(0)
    return (torch.empty_like(x), torch.empty_like(weight),
            x.new_empty(x.shape[-1], dtype=torch.float32), d_state)


def _initial_state_grad(dyf, xf, weight, bias, cache, cu, activation):
    """Tap i of token start+j reads K-1-i-j steps before the start, which is cache slot i+j, so
    d cache[n, c, m] = sum over i + j = m of w[c, i] * dpre[start_n + j]; the few dpre needed
    (the first K-1 tokens of each document) are recomputed here in torch."""
    k = weight.shape[-1]
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


def _conv_setup(ctx, inputs, output):
    x, weight, bias, cu, initial_state, activation = inputs
    ctx.activation = activation
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, weight, bias, cu, initial_state)


def _conv_backward(ctx, dy):
    x, weight, bias, cu, initial_state = ctx.saved_tensors
    dx, dw, db, d_state = _conv_bwd(dy, x, weight, bias, cu, initial_state, ctx.activation)
    return (dx, dw, db.to(bias.dtype) if ctx.has_bias else None, None,
            d_state.to(initial_state.dtype) if initial_state is not None else None, None)


_conv_fwd.register_autograd(_conv_backward, setup_context=_conv_setup)


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
    # the kernels' tiles hold 2(K-1) halo rows; wider kernels than short convolutions use torch
    if not use_triton(x, weight) or 2 * (weight.shape[-1] - 1) >= _BWD_BLOCK_T:
        return causal_conv1d_ref(x, weight, bias, activation, cu_seqlens, initial_state, output_final_state)
    b, t, c = x.shape
    if cu_seqlens is None:
        cu = torch.arange(0, (b + 1) * t, t, device=x.device, dtype=torch.int32)
    else:
        cu = cu_seqlens.to(torch.int32)
    y = _conv_fwd(x, weight, bias, cu, initial_state, activation or "none")
    final = None
    if output_final_state:
        k = weight.shape[-1]
        xf, cu64, _, _ = _documents(x, cu)
        starts, ends = cu64[:-1], cu64[1:]
        docs = torch.arange(starts.shape[0], device=x.device)
        final = torch.stack(
            [_input_at(xf, initial_state, docs, starts, ends - (k - 1 - i), k) for i in range(k - 1)], dim=-1
        )
    return y, final


def causal_conv1d_step(x, cache, weight, bias=None, activation="silu"):
    """One decoding step: x [N, C], cache [N, C, K-1] -> (y [N, C], new cache). Small; plain torch."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation={activation!r} is not one of {ACTIVATIONS}")
    want = (x.shape[0], x.shape[1], weight.shape[-1] - 1)
    if x.dim() != 2 or tuple(cache.shape) != want:
        raise ValueError(f"x must be [N, C] and cache {want}; got x {tuple(x.shape)}, cache {tuple(cache.shape)}")
    return causal_conv1d_step_ref(x, cache, weight, bias, activation)
