"""Triton kernels of chunked gated linear attention (imports only triton).

Sequences are cut into chunks of BT = 64 tokens; every kernel but the state scan (and the
scalar gate's fused forward, which walks a segment's chunks with the state) is parallel over
chunks. Notation inside a chunk of L valid rows: b = cumulative sum of the
log decay g (fp32, per key dimension; a scalar gate is broadcast over K), b_L its last row,
h_n the state entering chunk n, dh_n the gradient of the state leaving chunk n.

    o_t    = scale * [(q_t * e^{b_t}) h_n + sum_{s<=t} (sum_k q_tk k_sk e^{b_tk - b_sk}) v_s]
    h_n+1  = e^{b_L} * h_n + (k * e^{b_L - b})^T v

A scalar gate makes the intra-chunk decay e^{b_t - b_s} one [BT, BT] matrix, so its kernels
are whole-chunk matmuls. A per-key-dim gate (GLA) first forms the score matrix
A[t, s] = scale sum_k q_tk k_sk e^{b_tk - b_sk} per BC = 16-row block ("secondary chunking"):
for pairs in different blocks the decay factors through a reference row r between them,
e^{b_t - r} * e^{r - b_s}, both exponents <= 0 so nothing overflows and the product is a
tensor-core matmul; within a block the decay is formed exactly per pair. A chunk whose b spreads
over at most MAX_SPREAD nats in every key dim (the usual case: gates decay by well under a nat
per step) takes all its pairs through reference rows instead, factors within e^{+-MAX_SPREAD},
as whole-chunk fp32 products (the output kernel forms its A; the gradient kernel its
intra-chunk dq, dk); flags per chunk and head say which way each chunk went. The rest is again
whole-chunk matmuls (o = scale (q e^b) h + A v and the gradients). With q/k heads shared by
groups of value heads (Mamba2), the scalar gate's backward sums dq and dk over each group
inside its kernels.

Grids are sized by an upper bound on the number of chunks (no host synchronisation);
programs whose chunk slot lies past the real chunks return at once.
"""

import triton
import triton.language as tl

from flame.kernels.utils import chunk_head_ids

CHUNK_SIZE = 64
SUB_CHUNK_SIZE = 16
BT = tl.constexpr(CHUNK_SIZE)
BC = tl.constexpr(SUB_CHUNK_SIZE)


@triton.jit
def _span_bounds(cu_ptr, span_idx_ptr, i_s, N, size):
    """(sequence, first token, end token, end of sequence) of slot i_s of a sequence's spans of
    `size` tokens (chunks, or the fused forward's segments); sequence == N past the end."""
    seq = tl.load(span_idx_ptr + 2 * i_s)
    span = tl.load(span_idx_ptr + 2 * i_s + 1)
    seq_c = tl.minimum(seq, N - 1)
    # 64-bit token offsets: T * H * D passes 2^31 for long packed batches.
    bos = tl.load(cu_ptr + seq_c).to(tl.int64)
    eos = tl.load(cu_ptr + seq_c + 1).to(tl.int64)
    start = bos + span.to(tl.int64) * size
    return seq, start, tl.minimum(eos, start + size), eos


@triton.jit
def _chunk_bounds(cu_ptr, chunk_idx_ptr, i_c, N):
    """(sequence, first token, valid rows) of chunk slot i_c; sequence == N past the end."""
    seq, t0, end, _ = _span_bounds(cu_ptr, chunk_idx_ptr, i_c, N, BT)
    return seq, t0, (end - t0).to(tl.int32)


@triton.jit
def _spread_of(b, m):
    """Spread of a [BT, BK] tile of b over its masked rows, per column: max_t b - min_t b."""
    top = tl.max(tl.where(m, b, float("-inf")), axis=0)
    low = tl.min(tl.where(m, b, float("inf")), axis=0)
    return tl.where(tl.max(m.to(tl.int32), axis=0) > 0, top - low, 0.0)


@triton.jit(do_not_specialize=["N"])
def chunk_cumsum_kernel(
    g_ptr, b_ptr, flag_ptr, cu_ptr, chunk_idx_ptr, N,
    H: tl.constexpr, K: tl.constexpr, SCALAR_GATE: tl.constexpr, BK: tl.constexpr,
    FLAGS: tl.constexpr, MAX_SPREAD: tl.constexpr,
):
    """b = chunk-local inclusive cumulative sum of g, fp32 [T, H] or [T, H, K]. With FLAGS (a
    per-key-dim gate, one program per chunk and head walking K) it also records in
    flag[chunk, head] whether the chunk's spread of b is at most MAX_SPREAD (`_chunk_spread`)."""
    i_c, i_h, i_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    seq, t0, L = _chunk_bounds(cu_ptr, chunk_idx_ptr, i_c, N)
    if seq >= N:
        return
    rows = tl.arange(0, BT)
    if SCALAR_GATE:
        g = tl.load(g_ptr + (t0 + rows) * H + i_h, mask=rows < L, other=0.0)
        b = tl.cumsum(g.to(tl.float32), axis=0)
        tl.store(b_ptr + (t0 + rows) * H + i_h, b, mask=rows < L)
    elif FLAGS:
        spread = tl.zeros([BK], dtype=tl.float32)
        for k0 in range(0, K, BK):
            cols = k0 + tl.arange(0, BK)
            mask = (rows[:, None] < L) & (cols[None, :] < K)
            g = tl.load(g_ptr + ((t0 + rows[:, None]) * H + i_h) * K + cols[None, :], mask=mask, other=0.0)
            b = tl.cumsum(g.to(tl.float32), axis=0)
            tl.store(b_ptr + ((t0 + rows[:, None]) * H + i_h) * K + cols[None, :], b, mask=mask)
            spread = tl.maximum(spread, _spread_of(b, mask))
        tl.store(flag_ptr + i_c * H + i_h, (tl.max(spread, axis=0) <= MAX_SPREAD).to(tl.int32))
    else:
        cols = i_k * BK + tl.arange(0, BK)
        mask = (rows[:, None] < L) & (cols[None, :] < K)
        g = tl.load(g_ptr + ((t0 + rows[:, None]) * H + i_h) * K + cols[None, :], mask=mask, other=0.0)
        b = tl.cumsum(g.to(tl.float32), axis=0)
        tl.store(b_ptr + ((t0 + rows[:, None]) * H + i_h) * K + cols[None, :], b, mask=mask)


@triton.jit
def _state_pass(
    x_ptr, y_ptr, b_ptr, start_ptr, states_ptr, end_ptr, i_n, i_h, i_k, i_v, bos, eos, first, num_chunks, scale,
    SCALAR_GATE: tl.constexpr, H: tl.constexpr, HQ: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    REVERSE: tl.constexpr, HAS_START: tl.constexpr, STORE_END: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
):
    """One [BK, BV] tile of the recurrence over a sequence's chunks, state kept in fp32 registers.

    Forward (x, y = k, v): states[c] = h entering chunk c; h <- e^{b_L} h + (k e^{b_L - b})^T v.
    REVERSE (x, y = q, do): states[c] = dh leaving chunk c; dh <- e^{b_L} dh + scale (q e^{b})^T do.
    The chunk tiles do not depend on h, so their loads are pipelined ahead of the update.
    x has HQ heads (q/k heads), shared by H // HQ consecutive value heads.
    """
    rows = tl.arange(0, BT)
    ck = i_k * BK + tl.arange(0, BK)
    cv = i_v * BV + tl.arange(0, BV)
    mask = (ck[:, None] < K) & (cv[None, :] < V)
    tile = ck[:, None] * V + cv[None, :]
    if HAS_START:
        h = tl.load(start_ptr + (i_n * H + i_h) * K * V + tile, mask=mask, other=0.0).to(tl.float32)
    else:
        h = tl.zeros([BK, BV], dtype=tl.float32)
    for i in range(0, num_chunks):
        c = num_chunks - 1 - i if REVERSE else i
        slot = first + c
        t0 = bos + c * BT
        L = tl.minimum(eos - t0, BT).to(tl.int32)
        tl.store(states_ptr + (slot * H + i_h) * K * V + tile, h.to(states_ptr.dtype.element_ty), mask=mask)
        mk = (rows[:, None] < L) & (ck[None, :] < K)
        x = tl.load(x_ptr + ((t0 + rows[:, None]) * HQ + i_h // (H // HQ)) * K + ck[None, :], mask=mk, other=0.0)
        y = tl.load(y_ptr + ((t0 + rows[:, None]) * H + i_h) * V + cv[None, :],
                    mask=(rows[:, None] < L) & (cv[None, :] < V), other=0.0)
        if SCALAR_GATE:
            b = tl.load(b_ptr + (t0 + rows) * H + i_h, mask=rows < L, other=0.0)
            b_last = tl.load(b_ptr + (t0 + L - 1) * H + i_h)
            if REVERSE:
                w = tl.where(rows < L, tl.exp(b) * scale, 0.0)
            else:
                w = tl.where(rows < L, tl.exp(b_last - b), 0.0)
            xd = (x.to(tl.float32) * w[:, None]).to(y.dtype)
            h = h * tl.exp(b_last) + tl.dot(tl.trans(xd), y)
        else:
            b = tl.load(b_ptr + ((t0 + rows[:, None]) * H + i_h) * K + ck[None, :], mask=mk, other=0.0)
            b_last = tl.load(b_ptr + ((t0 + L - 1) * H + i_h) * K + ck, mask=ck < K, other=0.0)
            if REVERSE:
                w = tl.where(mk, tl.exp(b) * scale, 0.0)
            else:
                w = tl.where(mk, tl.exp(b_last[None, :] - b), 0.0)
            xd = (x.to(tl.float32) * w).to(y.dtype)
            h = h * tl.exp(b_last)[:, None] + tl.dot(tl.trans(xd), y)
    if STORE_END:
        tl.store(end_ptr + (i_n * H + i_h) * K * V + tile, h, mask=mask)


@triton.jit(do_not_specialize=["N"])
def chunk_state_kernel(
    k_ptr, v_ptr, q_ptr, do_ptr, b_ptr, h0_ptr, dht_ptr, h_ptr, dh_ptr, ht_ptr, dh0_ptr,
    cu_ptr, chunk_offsets_ptr, N, scale,
    SCALAR_GATE: tl.constexpr, H: tl.constexpr, HQ: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    FORWARD: tl.constexpr, BACKWARD: tl.constexpr, HAS_H0: tl.constexpr, HAS_DHT: tl.constexpr,
    STORE_HT: tl.constexpr, STORE_DH0: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
):
    """The only sequential passes, one program per (K, V tile, head, sequence, direction).

    FORWARD writes h (state entering each chunk) and ht; BACKWARD writes dh (gradient of the
    state leaving each chunk) and dh0. With both, the two independent passes share one launch:
    programs past the first N sequences run the reverse pass, which doubles the parallelism
    when few long sequences leave SMs idle.
    """
    i_kv, i_h, i_p = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    NV: tl.constexpr = (V + BV - 1) // BV
    i_k, i_v = i_kv // NV, i_kv % NV
    if FORWARD and BACKWARD:
        reverse = i_p >= N
    elif BACKWARD:
        reverse = i_p >= 0
    else:
        reverse = i_p < 0
    i_n = i_p % N
    bos = tl.load(cu_ptr + i_n).to(tl.int64)
    eos = tl.load(cu_ptr + i_n + 1).to(tl.int64)
    first = tl.load(chunk_offsets_ptr + i_n).to(tl.int64)
    num_chunks = (tl.load(chunk_offsets_ptr + i_n + 1) - first).to(tl.int32)
    if reverse:
        _state_pass(q_ptr, do_ptr, b_ptr, dht_ptr, dh_ptr, dh0_ptr, i_n, i_h, i_k, i_v, bos, eos, first,
                    num_chunks, scale, SCALAR_GATE, H, HQ, K, V, True, HAS_DHT, STORE_DH0, BK, BV)
    else:
        _state_pass(k_ptr, v_ptr, b_ptr, h0_ptr, h_ptr, ht_ptr, i_n, i_h, i_k, i_v, bos, eos, first,
                    num_chunks, 1.0, SCALAR_GATE, H, HQ, K, V, False, HAS_H0, STORE_HT, BK, BV)


@triton.jit
def _decay_matrix(b, rows, L, TRANSPOSED: tl.constexpr):
    """Scalar gate: e^{b_t - b_s} for s <= t < L, zero elsewhere ([t, s], or [s, t] if TRANSPOSED)."""
    if TRANSPOSED:
        causal = (rows[None, :] >= rows[:, None]) & (rows[None, :] < L)
        diff = b[None, :] - b[:, None]
    else:
        causal = (rows[:, None] >= rows[None, :]) & (rows[:, None] < L)
        diff = b[:, None] - b[None, :]
    return tl.exp(tl.where(causal, diff, float("-inf")))


@triton.jit
def _scalar_gate_grad(db, dbl):
    """Scalar gate: dg_t = sum_{t' >= t in the chunk} db_t' + dbl, from the gradient db [BT] of
    the cumulative sums b and dbl, that of b_L through the state leaving the chunk."""
    return tl.sum(db, axis=0) - tl.cumsum(db, axis=0) + db + dbl


@triton.jit
def _whole_chunk_tiles(L, k0, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """Index vectors of a program holding a whole chunk (rows), a K tile from k0 and all of V,
    with the masks of [BT, BK], [BT, BV] and [BK, BV] tiles (rows from L on masked)."""
    rows = tl.arange(0, BT)
    valid = rows < L
    ck = k0 + tl.arange(0, BK)
    cv = tl.arange(0, BV)
    mk = valid[:, None] & (ck[None, :] < K)
    mv = valid[:, None] & (cv[None, :] < V)
    mkv = (ck[:, None] < K) & (cv[None, :] < V)
    return rows, valid, ck, cv, mk, mv, mkv


@triton.jit
def _value_head_chunk(b_ptr, do_ptr, v_ptr, h_ptr, dh_ptr, i_c, i_h, t0, L, rows, valid, ck, cv, mv, mkv,
                      H: tl.constexpr, K: tl.constexpr, V: tl.constexpr):
    """One value head's tiles of a chunk for the scalar-gate backward: the gate cumsum b (and
    its last row), do, v [BT, BV], and the chunk's state h and its gradient dh [BK, BV] in do's
    dtype. Returns them with the offsets pv of this head's [BT, BV] tiles."""
    dtype = do_ptr.dtype.element_ty
    pv = ((t0 + rows[:, None]) * H + i_h) * V + cv[None, :]
    ph = ((i_c.to(tl.int64) * H + i_h) * K + ck[:, None]) * V + cv[None, :]
    b = tl.load(b_ptr + (t0 + rows) * H + i_h, mask=valid, other=0.0)
    b_last = tl.load(b_ptr + (t0 + L - 1) * H + i_h)
    do = tl.load(do_ptr + pv, mask=mv, other=0.0)
    v = tl.load(v_ptr + pv, mask=mv, other=0.0)
    h = tl.load(h_ptr + ph, mask=mkv, other=0.0).to(dtype)
    dh = tl.load(dh_ptr + ph, mask=mkv, other=0.0).to(dtype)
    return pv, b, b_last, do, v, h, dh


@triton.jit(do_not_specialize=["N"])
def chunk_output_scalar_kernel(
    q_ptr, k_ptr, v_ptr, b_ptr, h_ptr, o_ptr, cu_ptr, chunk_idx_ptr, N, scale,
    H: tl.constexpr, HQ: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
):
    """Scalar gate, one whole chunk per program: o = scale [(q k^T * D) v + e^{b} (q h)].

    One decay per row makes D = e^{b_t - b_s} a [BT, BT] matrix, so the intra-chunk term is
    two full-chunk matmuls with no sub-chunks. The V tiles of a chunk are adjacent programs.
    """
    NV: tl.constexpr = (V + BV - 1) // BV
    i_c, i_v, i_h = tl.program_id(0) // NV, tl.program_id(0) % NV, tl.program_id(1)
    seq, t0, L = _chunk_bounds(cu_ptr, chunk_idx_ptr, i_c, N)
    if seq >= N:
        return
    dtype = q_ptr.dtype.element_ty
    rows = tl.arange(0, BT)
    valid = rows < L
    cv = i_v * BV + tl.arange(0, BV)
    mv = valid[:, None] & (cv[None, :] < V)
    b = tl.load(b_ptr + (t0 + rows) * H + i_h, mask=valid, other=0.0)
    a = tl.zeros([BT, BT], dtype=tl.float32)
    o = tl.zeros([BT, BV], dtype=tl.float32)
    for k0 in range(0, K, BK):
        ck = k0 + tl.arange(0, BK)
        mk = valid[:, None] & (ck[None, :] < K)
        q = tl.load(q_ptr + ((t0 + rows[:, None]) * HQ + i_h // (H // HQ)) * K + ck[None, :], mask=mk, other=0.0)
        k = tl.load(k_ptr + ((t0 + rows[:, None]) * HQ + i_h // (H // HQ)) * K + ck[None, :], mask=mk, other=0.0)
        h = tl.load(h_ptr + ((i_c.to(tl.int64) * H + i_h) * K + ck[:, None]) * V + cv[None, :],
                    mask=(ck[:, None] < K) & (cv[None, :] < V), other=0.0)
        a += tl.dot(q, tl.trans(k))
        o += tl.dot(q, h.to(dtype))
    a = (a * _decay_matrix(b, rows, L, False)).to(dtype)
    v = tl.load(v_ptr + ((t0 + rows[:, None]) * H + i_h) * V + cv[None, :], mask=mv, other=0.0)
    o = o * tl.exp(b)[:, None] + tl.dot(a, v)
    tl.store(o_ptr + ((t0 + rows[:, None]) * H + i_h) * V + cv[None, :], (o * scale).to(dtype), mask=mv)


@triton.jit
def _scalar_gate_cumsum(g, rows, L):
    """A scalar gate's cumulative sums b in a chunk (g zero from row L on) and b at row L - 1,
    taken from b itself so that b_L - b has the rounding of neither sum twice."""
    b = tl.cumsum(g, axis=0)
    return b, tl.sum(tl.where(rows == L - 1, b, 0.0), axis=0)


@triton.jit
def _scalar_chunk_update(h, k, v, b, b_last, valid, dtype):
    """Scalar gate: the state leaving a chunk, e^{b_L} h + (k e^{b_L - b})^T v (h fp32; k, v
    [BT, *] tiles; b the chunk's cumulative gate sums; rows not valid count for nothing)."""
    kd = (k.to(tl.float32) * tl.where(valid, tl.exp(b_last - b), 0.0)[:, None]).to(dtype)
    return h * tl.exp(b_last) + tl.dot(tl.trans(kd), v)


@triton.jit(do_not_specialize=["N", "seg_len"])
def chunk_segment_state_scalar_kernel(
    k_ptr, v_ptr, g_ptr, states_ptr, decay_ptr, cu_ptr, seg_idx_ptr, N, seg_len,
    H: tl.constexpr, HQ: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
):
    """Scalar gate, first pass of the segmented fused forward: the state leaving each segment of
    seg_len tokens when it is entered with a zero state, and the segment's summed log decay:
        states[s] = sum_t e^{G_end - G_t} k_t^T v_t,   decay[s] = G_end - G_start
    (fp32). A sequence's last segment passes nothing on, so its programs return at once."""
    i_v, i_h, i_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    dtype = k_ptr.dtype.element_ty
    seq, start, end, eos = _span_bounds(cu_ptr, seg_idx_ptr, i_s, N, seg_len)
    if (seq >= N) | (end >= eos):
        return
    rows = tl.arange(0, BT)
    ck = tl.arange(0, BK)
    cv = i_v * BV + tl.arange(0, BV)
    i_q = i_h // (H // HQ)
    h = tl.zeros([BK, BV], dtype=tl.float32)
    total = tl.zeros([BT], dtype=tl.float32)
    for t0 in range(start, end, BT):
        L = tl.minimum(end - t0, BT).to(tl.int32)
        valid = rows < L
        k = tl.load(k_ptr + ((t0 + rows[:, None]) * HQ + i_q) * K + ck[None, :],
                    mask=valid[:, None] & (ck[None, :] < K), other=0.0)
        v = tl.load(v_ptr + ((t0 + rows[:, None]) * H + i_h) * V + cv[None, :],
                    mask=valid[:, None] & (cv[None, :] < V), other=0.0)
        g = tl.load(g_ptr + (t0 + rows) * H + i_h, mask=valid, other=0.0).to(tl.float32)
        b, b_last = _scalar_gate_cumsum(g, rows, L)
        h = _scalar_chunk_update(h, k, v, b, b_last, valid, dtype)
        total += g
    tl.store(states_ptr + ((i_s.to(tl.int64) * H + i_h) * K + ck[:, None]) * V + cv[None, :], h,
             mask=(ck[:, None] < K) & (cv[None, :] < V))
    if i_v == 0:
        tl.store(decay_ptr + i_s * H + i_h, tl.sum(total, axis=0))


@triton.jit(do_not_specialize=["N", "seg_len"])
def chunk_fused_forward_scalar_kernel(
    q_ptr, k_ptr, v_ptr, g_ptr, h0_ptr, states_ptr, decay_ptr, o_ptr, ht_ptr, h_ptr, cu_ptr, seg_idx_ptr,
    seg_offsets_ptr, chunk_offsets_ptr, N, seg_len, scale,
    H: tl.constexpr, HQ: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_H0: tl.constexpr, STORE_HT: tl.constexpr, CARRY: tl.constexpr, STORE_H: tl.constexpr,
):
    """Scalar gate, K <= BK: the whole forward of one segment (seg_len tokens of a sequence),
    value head and V tile, serial over its chunks with the state in fp32 registers:
        o = scale [(q k^T * D) v + e^{b} (q h)],   h <- e^{b_L} h + (k e^{b_L - b})^T v
    with b the chunk's cumulative sum of g, formed here. Nothing but o (and ht) is written:
    no chunk states, no cumsum. The output's products do not depend on the state update, so
    only h's update is on the serial chain, at most seg_len / 64 chunks long. With CARRY, a
    segment after a sequence's first enters with the state the earlier segments leave,
    combined from their zero-entry states and decays (`chunk_segment_state_scalar_kernel`):
    h <- e^{decay[r]} h + states[r] for each earlier segment r, starting from h0 or zero.
    STORE_H: also write each chunk's entry state to h [chunk slots, H, K, V] in q's dtype, the
    chunk states the state pass would form, for the backward.
    """
    i_v, i_h, i_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    dtype = q_ptr.dtype.element_ty
    seq, start, end, eos = _span_bounds(cu_ptr, seg_idx_ptr, i_s, N, seg_len)
    if seq >= N:
        return
    rows = tl.arange(0, BT)
    ck = tl.arange(0, BK)
    cv = i_v * BV + tl.arange(0, BV)
    mkv = (ck[:, None] < K) & (cv[None, :] < V)
    tile = ck[:, None] * V + cv[None, :]
    if HAS_H0:
        h = tl.load(h0_ptr + (seq.to(tl.int64) * H + i_h) * K * V + tile, mask=mkv, other=0.0).to(tl.float32)
    else:
        h = tl.zeros([BK, BV], dtype=tl.float32)
    if CARRY:
        for r in range(tl.load(seg_offsets_ptr + seq), i_s):
            h = h * tl.exp(tl.load(decay_ptr + r * H + i_h)) + tl.load(
                states_ptr + (r * H + i_h).to(tl.int64) * K * V + tile, mask=mkv, other=0.0)
    i_q = i_h // (H // HQ)
    if STORE_H:  # the segment's first chunk slot; its later chunks follow it
        slot = tl.load(chunk_offsets_ptr + seq).to(tl.int64) + (start - tl.load(cu_ptr + seq)) // BT
    for t0 in range(start, end, BT):
        L = tl.minimum(end - t0, BT).to(tl.int32)
        valid = rows < L
        mk = valid[:, None] & (ck[None, :] < K)
        mv = valid[:, None] & (cv[None, :] < V)
        q = tl.load(q_ptr + ((t0 + rows[:, None]) * HQ + i_q) * K + ck[None, :], mask=mk, other=0.0)
        k = tl.load(k_ptr + ((t0 + rows[:, None]) * HQ + i_q) * K + ck[None, :], mask=mk, other=0.0)
        v = tl.load(v_ptr + ((t0 + rows[:, None]) * H + i_h) * V + cv[None, :], mask=mv, other=0.0)
        g = tl.load(g_ptr + (t0 + rows) * H + i_h, mask=valid, other=0.0).to(tl.float32)
        b, b_last = _scalar_gate_cumsum(g, rows, L)
        a = (tl.dot(q, tl.trans(k)) * _decay_matrix(b, rows, L, False)).to(dtype)
        if STORE_H:
            tl.store(h_ptr + (slot * H + i_h) * K * V + tile, h.to(dtype), mask=mkv)
            slot += 1
        o = tl.dot(q, h.to(dtype)) * tl.exp(b)[:, None] + tl.dot(a, v)
        tl.store(o_ptr + ((t0 + rows[:, None]) * H + i_h) * V + cv[None, :], (o * scale).to(dtype), mask=mv)
        h = _scalar_chunk_update(h, k, v, b, b_last, valid, dtype)
    if STORE_HT & (end >= eos):
        tl.store(ht_ptr + (seq.to(tl.int64) * H + i_h) * K * V + tile, h, mask=mkv)


@triton.jit(do_not_specialize=["N"])
def chunk_backward_dv_scalar_kernel(
    q_ptr, k_ptr, b_ptr, do_ptr, dh_ptr, dv_ptr, cu_ptr, chunk_idx_ptr, N, scale,
    H: tl.constexpr, HQ: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
):
    """Scalar gate: dv = scale (k q^T * D^T) do + (k e^{b_L - b}) dh, one chunk and V tile."""
    NV: tl.constexpr = (V + BV - 1) // BV
    i_c, i_v, i_h = tl.program_id(0) // NV, tl.program_id(0) % NV, tl.program_id(1)
    seq, t0, L = _chunk_bounds(cu_ptr, chunk_idx_ptr, i_c, N)
    if seq >= N:
        return
    dtype = q_ptr.dtype.element_ty
    rows = tl.arange(0, BT)
    valid = rows < L
    cv = i_v * BV + tl.arange(0, BV)
    mv = valid[:, None] & (cv[None, :] < V)
    b = tl.load(b_ptr + (t0 + rows) * H + i_h, mask=valid, other=0.0)
    b_last = tl.load(b_ptr + (t0 + L - 1) * H + i_h)
    at = tl.zeros([BT, BT], dtype=tl.float32)  # at[s, t] = k_s . q_t
    dv = tl.zeros([BT, BV], dtype=tl.float32)
    for k0 in range(0, K, BK):
        ck = k0 + tl.arange(0, BK)
        mk = valid[:, None] & (ck[None, :] < K)
        q = tl.load(q_ptr + ((t0 + rows[:, None]) * HQ + i_h // (H // HQ)) * K + ck[None, :], mask=mk, other=0.0)
        k = tl.load(k_ptr + ((t0 + rows[:, None]) * HQ + i_h // (H // HQ)) * K + ck[None, :], mask=mk, other=0.0)
        dh = tl.load(dh_ptr + ((i_c.to(tl.int64) * H + i_h) * K + ck[:, None]) * V + cv[None, :],
                     mask=(ck[:, None] < K) & (cv[None, :] < V), other=0.0)
        at += tl.dot(k, tl.trans(q))
        dv += tl.dot(k, dh.to(dtype))
    at = (at * _decay_matrix(b, rows, L, True) * scale).to(dtype)
    do = tl.load(do_ptr + ((t0 + rows[:, None]) * H + i_h) * V + cv[None, :], mask=mv, other=0.0)
    dv = dv * tl.where(valid, tl.exp(b_last - b), 0.0)[:, None] + tl.dot(at, do)
    tl.store(dv_ptr + ((t0 + rows[:, None]) * H + i_h) * V + cv[None, :], dv.to(dtype), mask=mv)


@triton.jit(do_not_specialize=["N"])
def chunk_backward_dqk_scalar_kernel(
    q_ptr, k_ptr, v_ptr, b_ptr, do_ptr, h_ptr, dh_ptr, dq_ptr, dk_ptr, db_ptr, dbl_ptr,
    cu_ptr, chunk_idx_ptr, N, T_total, scale,
    H: tl.constexpr, HQ: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
):
    """Scalar gate: dq, dk of one chunk and K tile, and this tile's part of the gate gradient.

    W = scale (do v^T * D); dq = W k + scale e^{b} (do h^T); dk = W^T q + e^{b_L - b} (v dh^T).
    db [NK, T, H] gets sum_k (q dq - k dk) per row (gradient of b); dbl [NK, slots, H] the
    gradient of b_L through the state leaving the chunk. The gate-gradient kernel sums them.
    """
    NK: tl.constexpr = (K + BK - 1) // BK
    i_c, i_k, i_h = tl.program_id(0) // NK, tl.program_id(0) % NK, tl.program_id(1)
    seq, t0, L = _chunk_bounds(cu_ptr, chunk_idx_ptr, i_c, N)
    if seq >= N:
        return
    dtype = q_ptr.dtype.element_ty
    rows = tl.arange(0, BT)
    valid = rows < L
    ck = i_k * BK + tl.arange(0, BK)
    mk = valid[:, None] & (ck[None, :] < K)
    b = tl.load(b_ptr + (t0 + rows) * H + i_h, mask=valid, other=0.0)
    b_last = tl.load(b_ptr + (t0 + L - 1) * H + i_h)
    da = tl.zeros([BT, BT], dtype=tl.float32)
    dq = tl.zeros([BT, BK], dtype=tl.float32)
    dk = tl.zeros([BT, BK], dtype=tl.float32)
    hdh = tl.zeros([BK], dtype=tl.float32)
    for v0 in range(0, V, BV):
        cv = v0 + tl.arange(0, BV)
        mv = valid[:, None] & (cv[None, :] < V)
        mkv = (ck[:, None] < K) & (cv[None, :] < V)
        do = tl.load(do_ptr + ((t0 + rows[:, None]) * H + i_h) * V + cv[None, :], mask=mv, other=0.0)
        v = tl.load(v_ptr + ((t0 + rows[:, None]) * H + i_h) * V + cv[None, :], mask=mv, other=0.0)
        h = tl.load(h_ptr + ((i_c.to(tl.int64) * H + i_h) * K + ck[:, None]) * V + cv[None, :], mask=mkv, other=0.0)
        dh = tl.load(dh_ptr + ((i_c.to(tl.int64) * H + i_h) * K + ck[:, None]) * V + cv[None, :], mask=mkv, other=0.0)
        da += tl.dot(do, tl.trans(v))
        dq += tl.dot(do, tl.trans(h.to(dtype)))
        dk += tl.dot(v, tl.trans(dh.to(dtype)))
        hdh += tl.sum(h.to(tl.float32) * dh.to(tl.float32), axis=1)
    q = tl.load(q_ptr + ((t0 + rows[:, None]) * HQ + i_h // (H // HQ)) * K + ck[None, :], mask=mk, other=0.0)
    k = tl.load(k_ptr + ((t0 + rows[:, None]) * HQ + i_h // (H // HQ)) * K + ck[None, :], mask=mk, other=0.0)
    dq = dq * tl.where(valid, tl.exp(b) * scale, 0.0)[:, None]
    dk = dk * tl.where(valid, tl.exp(b_last - b), 0.0)[:, None]
    dbl = tl.sum(tl.sum(k.to(tl.float32) * dk, axis=1), axis=0) + tl.exp(b_last) * tl.sum(hdh, axis=0)
    w = (da * _decay_matrix(b, rows, L, False) * scale).to(dtype)
    dq += tl.dot(w, k)
    dk += tl.dot(tl.trans(w), q)
    db = tl.sum(q.to(tl.float32) * dq - k.to(tl.float32) * dk, axis=1)
    p = ((t0 + rows[:, None]) * H + i_h) * K + ck[None, :]
    tl.store(dq_ptr + p, dq.to(dtype), mask=mk)
    tl.store(dk_ptr + p, dk.to(dtype), mask=mk)
    tl.store(db_ptr + (i_k * T_total + t0 + rows) * H + i_h, db, mask=valid)
    tl.store(dbl_ptr + (i_k * (tl.num_programs(0) // NK) + i_c) * H + i_h, dbl)


@triton.jit(do_not_specialize=["N"])
def chunk_backward_scalar_kernel(
    q_ptr, k_ptr, v_ptr, b_ptr, do_ptr, h_ptr, dh_ptr, dq_ptr, dk_ptr, dv_ptr, dg_ptr,
    cu_ptr, chunk_idx_ptr, N, scale,
    H: tl.constexpr, HQ: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HEADS_FAST: tl.constexpr,
):
    """Scalar gate, K <= BK: dq, dk, dv and dg of one whole chunk in one program, walking V in
    BV-column tiles.

    The same products as the dv and dqk kernels, but q, k, v, do, h, dh are read once per chunk
    instead of once per kernel, and the gate gradient (a reverse cumulative sum over the chunk)
    is finished here. q, k and the transposed scores are held for the whole chunk; each V
    tile's do, v, h and dh are loaded once (pipelined over the loop by num_stages), give that
    tile's dv, and add to the fp32 sums over V: W = do v^T, v dh^T, do h^T and <h, dh>. dq, dk
    and dg follow after the loop.
    """
    i_c, i_h = chunk_head_ids(HEADS_FAST, False)
    seq, t0, L = _chunk_bounds(cu_ptr, chunk_idx_ptr, i_c, N)
    if seq >= N:
        return
    dtype = q_ptr.dtype.element_ty
    rows, valid, ck, _, mk, _, _ = _whole_chunk_tiles(L, 0, K, V, BK, BV)
    pq = ((t0 + rows[:, None]) * HQ + i_h // (H // HQ)) * K + ck[None, :]  # q, k (shared by a group)
    pk = ((t0 + rows[:, None]) * H + i_h) * K + ck[None, :]  # dq, dk (per value head)
    b = tl.load(b_ptr + (t0 + rows) * H + i_h, mask=valid, other=0.0)
    b_last = tl.load(b_ptr + (t0 + L - 1) * H + i_h)
    q = tl.load(q_ptr + pq, mask=mk, other=0.0)
    k = tl.load(k_ptr + pq, mask=mk, other=0.0)
    decay_out = tl.where(valid, tl.exp(b_last - b), 0.0)
    at = (tl.dot(k, tl.trans(q)) * _decay_matrix(b, rows, L, True) * scale).to(dtype)
    w = tl.zeros([BT, BT], dtype=tl.float32)  # do v^T, summed over V
    dk_state = tl.zeros([BT, BK], dtype=tl.float32)  # v dh^T
    dq_state = tl.zeros([BT, BK], dtype=tl.float32)  # do h^T
    h_dh = 0.0  # <h, dh>
    for v0 in range(0, V, BV):
        cv = v0 + tl.arange(0, BV)
        mv = valid[:, None] & (cv[None, :] < V)
        mkv = (ck[:, None] < K) & (cv[None, :] < V)
        pv = ((t0 + rows[:, None]) * H + i_h) * V + cv[None, :]
        ph = ((i_c.to(tl.int64) * H + i_h) * K + ck[:, None]) * V + cv[None, :]
        do = tl.load(do_ptr + pv, mask=mv, other=0.0)
        v = tl.load(v_ptr + pv, mask=mv, other=0.0)
        h = tl.load(h_ptr + ph, mask=mkv, other=0.0).to(dtype)
        dh = tl.load(dh_ptr + ph, mask=mkv, other=0.0).to(dtype)
        # dv = scale (k q^T * D^T) do + e^{b_L - b} (k dh)
        dv = tl.dot(at, do, tl.dot(k, dh) * decay_out[:, None])
        tl.store(dv_ptr + pv, dv.to(dtype), mask=mv)
        w = tl.dot(do, tl.trans(v), w)
        dk_state = tl.dot(v, tl.trans(dh), dk_state)
        dq_state = tl.dot(do, tl.trans(h), dq_state)
        h_dh += tl.sum(tl.sum(h.to(tl.float32) * dh.to(tl.float32), axis=1), axis=0)
    # dk = W^T q + e^{b_L - b} (v dh^T), W = scale (do v^T * D)
    w = (w * _decay_matrix(b, rows, L, False) * scale).to(dtype)
    dk = dk_state * decay_out[:, None]
    kf = k.to(tl.float32)
    dbl = tl.sum(tl.sum(kf * dk, axis=1), axis=0) + tl.exp(b_last) * h_dh
    dk += tl.dot(tl.trans(w), q)
    tl.store(dk_ptr + pk, dk.to(dtype), mask=mk)
    db = -tl.sum(kf * dk, axis=1)
    # dq = W k + scale e^{b} (do h^T)
    dq = dq_state * tl.where(valid, tl.exp(b) * scale, 0.0)[:, None] + tl.dot(w, k)
    tl.store(dq_ptr + pk, dq.to(dtype), mask=mk)
    db += tl.sum(q.to(tl.float32) * dq, axis=1)
    dg = _scalar_gate_grad(db, dbl)
    tl.store(dg_ptr + (t0 + rows) * H + i_h, dg.to(dg_ptr.dtype.element_ty), mask=valid)


# ---------------------------------------------------------------------------------------------
# Scalar gate with q/k heads shared by groups of value heads (Mamba2's B and C are shared by
# all heads). The gradients of q and k are sums over a group; forming them per value head and
# summing afterwards writes and reads G times q's bytes twice. Instead one kernel forms dv and
# dg per value head without dq, dk, and a second sums dq, dk over the group inside its loop.


@triton.jit(do_not_specialize=["N"])
def chunk_backward_dv_dg_grouped_kernel(
    q_ptr, k_ptr, v_ptr, b_ptr, do_ptr, h_ptr, dh_ptr, dv_ptr, dg_ptr, cu_ptr, chunk_idx_ptr, N, scale,
    H: tl.constexpr, HQ: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HEADS: tl.constexpr,
):
    """Scalar gate, K <= BK, V <= BV: dv and dg of one chunk for HEADS value heads of one group.

    dv = scale (k q^T * D^T) do + e^{b_L - b} (k dh) as in the fused kernel. The gate gradient
    needs only the row sums q_t . dq_t and k_t . dk_t, which follow from [BT, BT] and [BT, V]
    products without dq, dk themselves (W = scale (do v^T * D), QK = q k^T):
        q_t . dq_t = sum_s W_ts QK_ts + scale e^{b_t} sum_v do_tv (q h)_tv
        k_t . dk_t = sum_s W_st QK_st + e^{b_L - b_t} sum_v v_tv (k dh)_tv
    QK is formed once for the HEADS heads, which share q and k.
    """
    i_c, i_p = tl.program_id(0), tl.program_id(1)
    seq, t0, L = _chunk_bounds(cu_ptr, chunk_idx_ptr, i_c, N)
    if seq >= N:
        return
    dtype = q_ptr.dtype.element_ty
    rows, valid, ck, cv, mk, mv, mkv = _whole_chunk_tiles(L, 0, K, V, BK, BV)
    i_q = (i_p * HEADS) // (H // HQ)
    pq = ((t0 + rows[:, None]) * HQ + i_q) * K + ck[None, :]
    q = tl.load(q_ptr + pq, mask=mk, other=0.0)
    k = tl.load(k_ptr + pq, mask=mk, other=0.0)
    qk = tl.dot(q, tl.trans(k))  # [t, s] = q_t . k_s
    kq = tl.trans(qk)  # [s, t]
    for j in range(HEADS):
        i_h = i_p * HEADS + j
        pv, b, b_last, do, v, h, dh = _value_head_chunk(b_ptr, do_ptr, v_ptr, h_ptr, dh_ptr, i_c, i_h, t0, L,
                                                        rows, valid, ck, cv, mv, mkv, H, K, V)
        decay_out = tl.where(valid, tl.exp(b_last - b), 0.0)
        kdh = tl.dot(k, dh)  # [t, v]
        at = (kq * _decay_matrix(b, rows, L, True) * scale).to(dtype)
        dv = tl.dot(at, do) + kdh * decay_out[:, None]
        tl.store(dv_ptr + pv, dv.to(dtype), mask=mv)
        wqk = tl.dot(do, tl.trans(v)) * _decay_matrix(b, rows, L, False) * scale * qk
        qh = tl.dot(q, h)  # [t, v]
        k_dk_inter = decay_out * tl.sum(v.to(tl.float32) * kdh, axis=1)
        q_dq_inter = tl.where(valid, tl.exp(b) * scale, 0.0) * tl.sum(do.to(tl.float32) * qh, axis=1)
        db = tl.sum(wqk, axis=1) - tl.sum(wqk, axis=0) + q_dq_inter - k_dk_inter
        dbl = tl.sum(k_dk_inter, axis=0) + tl.exp(b_last) * tl.sum(tl.sum(h.to(tl.float32) * dh.to(tl.float32),
                                                                          axis=1), axis=0)
        dg = _scalar_gate_grad(db, dbl)
        tl.store(dg_ptr + (t0 + rows) * H + i_h, dg.to(dg_ptr.dtype.element_ty), mask=valid)


@triton.jit(do_not_specialize=["N"])
def chunk_backward_dqk_grouped_kernel(
    q_ptr, k_ptr, v_ptr, b_ptr, do_ptr, h_ptr, dh_ptr, dq_ptr, dk_ptr, cu_ptr, chunk_idx_ptr, N, scale,
    H: tl.constexpr, HQ: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
):
    """Scalar gate, V <= BV: dq, dk of one chunk, K tile and q/k head, summed over its group.

    Over the group's value heads: dq = (sum W) k + scale sum (e^{b} do) h^T and
    dk = (sum W)^T q + sum (e^{b_L - b} v) dh^T, W = scale (do v^T * D) per head. The heads are
    the reduction loop of three accumulators, so nothing per value head is written.
    """
    NK: tl.constexpr = (K + BK - 1) // BK
    i_c, i_k, i_q = tl.program_id(0) // NK, tl.program_id(0) % NK, tl.program_id(1)
    seq, t0, L = _chunk_bounds(cu_ptr, chunk_idx_ptr, i_c, N)
    if seq >= N:
        return
    G: tl.constexpr = H // HQ
    dtype = q_ptr.dtype.element_ty
    rows, valid, ck, cv, mk, mv, mkv = _whole_chunk_tiles(L, i_k * BK, K, V, BK, BV)
    w = tl.zeros([BT, BT], dtype=tl.float32)
    dq = tl.zeros([BT, BK], dtype=tl.float32)
    dk = tl.zeros([BT, BK], dtype=tl.float32)
    for j in range(G):
        _, b, b_last, do, v, h, dh = _value_head_chunk(b_ptr, do_ptr, v_ptr, h_ptr, dh_ptr, i_c, i_q * G + j, t0, L,
                                                       rows, valid, ck, cv, mv, mkv, H, K, V)
        w += tl.dot(do, tl.trans(v)) * _decay_matrix(b, rows, L, False)
        do_in = (do.to(tl.float32) * tl.where(valid, tl.exp(b), 0.0)[:, None]).to(dtype)
        v_out = (v.to(tl.float32) * tl.where(valid, tl.exp(b_last - b), 0.0)[:, None]).to(dtype)
        dq += tl.dot(do_in, tl.trans(h))
        dk += tl.dot(v_out, tl.trans(dh))
    pq = ((t0 + rows[:, None]) * HQ + i_q) * K + ck[None, :]
    q = tl.load(q_ptr + pq, mask=mk, other=0.0)
    k = tl.load(k_ptr + pq, mask=mk, other=0.0)
    w = (w * scale).to(dtype)
    dq = dq * scale + tl.dot(w, k)
    dk += tl.dot(tl.trans(w), q)
    tl.store(dq_ptr + pq, dq.to(dtype), mask=mk)
    tl.store(dk_ptr + pq, dk.to(dtype), mask=mk)


@triton.jit(do_not_specialize=["N", "slots"])
def chunk_scalar_gate_grad_kernel(
    db_ptr, dbl_ptr, dg_ptr, cu_ptr, chunk_idx_ptr, N, T_total, slots,
    H: tl.constexpr, NK: tl.constexpr,
):
    """Scalar gate: dg_t = sum_{t' >= t in the chunk} db_t' + (gradient of b_L), summed over K tiles."""
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    seq, t0, L = _chunk_bounds(cu_ptr, chunk_idx_ptr, i_c, N)
    if seq >= N:
        return
    rows = tl.arange(0, BT)
    db = tl.zeros([BT], dtype=tl.float32)
    dbl = 0.0
    for i_k in range(0, NK):
        db += tl.load(db_ptr + (i_k * T_total + t0 + rows) * H + i_h, mask=rows < L, other=0.0)
        dbl += tl.load(dbl_ptr + (i_k * slots + i_c) * H + i_h)
    dg = _scalar_gate_grad(db, dbl)
    tl.store(dg_ptr + (t0 + rows) * H + i_h, dg.to(dg_ptr.dtype.element_ty), mask=rows < L)


# ---------------------------------------------------------------------------------------------
# Per-key-dim gate (GLA). The decay of a pair (t, s) differs per key dimension, so the scores
# A[t, s] = scale sum_k q_tk k_sk e^{b_tk - b_sk} are no single matmul. The intra kernels form
# A (and in the backward the intra-chunk dq, dk) per BC-row block of a chunk, with the exact
# pairwise decay only inside the diagonal block; everything else is a whole-chunk matmul:
# o = scale (q e^b) h + A v, dv = A^T do + (k e^{b_L - b}) dh, and the inter-chunk dq, dk.


@triton.jit
def _chunk_spread(b_ptr, t0, L, i_h, H: tl.constexpr, K: tl.constexpr, BK: tl.constexpr):
    """Largest spread of b over the chunk's valid rows in any key dim: every factor
    e^{b_t - b_r} between two of its rows lies within e^{+-spread}."""
    rows = tl.arange(0, BT)
    spread = tl.zeros([BK], dtype=tl.float32)
    for k0 in range(0, K, BK):
        ck = k0 + tl.arange(0, BK)
        m = (rows < L)[:, None] & (ck[None, :] < K)
        b = tl.load(b_ptr + ((t0 + rows[:, None]) * H + i_h) * K + ck[None, :], mask=m, other=0.0)
        spread = tl.maximum(spread, _spread_of(b, m))
    return tl.max(spread, axis=0)


@triton.jit
def _scores_through_first_row(q, k, b, b_ptr, t0, i_h, ck, mk, H: tl.constexpr, K: tl.constexpr):
    """One K tile's part of a chunk's A (scale not applied, s > t not masked) through the chunk's
    first row r: (q_t e^{b_t - r}) . (k_s e^{r - b_s}) for every pair, fp32 operands."""
    r = tl.load(b_ptr + (t0 * H + i_h) * K + ck, mask=ck < K, other=0.0)
    q_r = tl.where(mk, q.to(tl.float32) * tl.exp(b - r[None, :]), 0.0)
    k_r = tl.where(mk, k.to(tl.float32) * tl.exp(r[None, :] - b), 0.0)
    return tl.dot(q_r, tl.trans(k_r))


@triton.jit(do_not_specialize=["N"])
def chunk_gla_scores_chunk_kernel(
    q_ptr, k_ptr, b_ptr, a_ptr, flag_ptr, cu_ptr, chunk_idx_ptr, N, scale,
    H: tl.constexpr, K: tl.constexpr, BK: tl.constexpr, MAX_SPREAD: tl.constexpr, HEADS_FAST: tl.constexpr,
):
    """A [T, H, BT] of one chunk whose gate spread (`_chunk_spread`) is at most MAX_SPREAD, as
    one product through the chunk's first row r: (q_t e^{b_t - r}) . (k_s e^{r - b_s}), every
    factor within e^{+-MAX_SPREAD}, so finite; fp32 operands (tf32 on tensor cores), the
    entries s > t masked after the product. flag[chunk, head] records whether it did; the
    16-row-block kernel forms the other chunks' A with exact in-block pairs."""
    i_c, i_h = chunk_head_ids(HEADS_FAST, False)
    seq, t0, L = _chunk_bounds(cu_ptr, chunk_idx_ptr, i_c, N)
    if seq >= N:
        return
    fast = _chunk_spread(b_ptr, t0, L, i_h, H, K, BK) <= MAX_SPREAD
    tl.store(flag_ptr + i_c * H + i_h, fast.to(tl.int32))
    if not fast:
        return
    rows = tl.arange(0, BT)
    valid = rows < L
    acc = tl.zeros([BT, BT], dtype=tl.float32)
    for k0 in range(0, K, BK):
        ck = k0 + tl.arange(0, BK)
        mk = valid[:, None] & (ck[None, :] < K)
        tile = ((t0 + rows[:, None]) * H + i_h) * K + ck[None, :]
        q = tl.load(q_ptr + tile, mask=mk, other=0.0)
        k = tl.load(k_ptr + tile, mask=mk, other=0.0)
        b = tl.load(b_ptr + tile, mask=mk, other=0.0)
        acc += _scores_through_first_row(q, k, b, b_ptr, t0, i_h, ck, mk, H, K)
    causal = rows[None, :] <= rows[:, None]
    tl.store(a_ptr + ((t0 + rows[:, None]) * H + i_h) * BT + rows[None, :],
             tl.where(causal, acc * scale, 0.0).to(a_ptr.dtype.element_ty), mask=valid[:, None])


@triton.jit(do_not_specialize=["N"])
def chunk_gla_scores_kernel(
    q_ptr, k_ptr, b_ptr, a_ptr, flag_ptr, cu_ptr, chunk_idx_ptr, N, scale,
    H: tl.constexpr, K: tl.constexpr, BK: tl.constexpr, UNROLL: tl.constexpr, SPLIT_DIAG: tl.constexpr,
    HEADS_FAST: tl.constexpr,
):
    """A [T, H, BT] (zero for s > t and past the sequence) of one chunk that
    `chunk_gla_scores_chunk_kernel` left (flag 0), by BC-row blocks i, one after another.

    Keys in earlier blocks: one dot through the reference row r = the block's first row,
    (q_t e^{b_t - r}) . (k_s e^{r - b_s}), both exponents <= 0. Keys in block i: exact per pair,
    one key row at a time, UNROLL rows per loop step (their loads can then issue before the
    math of the first). SPLIT_DIAG keeps those scores in their own [BC, BC] tile, stored apart
    from the rest of the row, instead of adding each column into the [BC, BT] accumulator.
    """
    i_c, i_h = chunk_head_ids(HEADS_FAST, False)
    # The flag first: it needs no load of the chunk's bounds, and most chunks have it set.
    # (A slot past the last chunk may hold any flag; its bounds then say so.)
    if tl.load(flag_ptr + i_c * H + i_h) != 0:
        return
    seq, t0, L = _chunk_bounds(cu_ptr, chunk_idx_ptr, i_c, N)
    if seq >= N:
        return
    for i_i in range(0, tl.cdiv(L, BC)):  # the chunk's blocks, one after another
        dtype = q_ptr.dtype.element_ty
        rows = tl.arange(0, BT)
        cols_i = tl.arange(0, BC)
        rows_i = i_i * BC + cols_i
        valid_i = rows_i < L
        before = rows < i_i * BC
        ref = t0 + i_i * BC
        acc = tl.zeros([BC, BT], dtype=tl.float32)
        diag = tl.zeros([BC, BC], dtype=tl.float32)  # used with SPLIT_DIAG only
        for k0 in range(0, K, BK):
            ck = k0 + tl.arange(0, BK)
            mck = ck < K
            mi = valid_i[:, None] & mck[None, :]
            mb = before[:, None] & mck[None, :]
            q_i = tl.load(q_ptr + ((t0 + rows_i[:, None]) * H + i_h) * K + ck[None, :], mask=mi, other=0.0).to(tl.float32)
            b_i = tl.load(b_ptr + ((t0 + rows_i[:, None]) * H + i_h) * K + ck[None, :], mask=mi, other=0.0)
            r = tl.load(b_ptr + (ref * H + i_h) * K + ck, mask=mck, other=0.0)
            k_b = tl.load(k_ptr + ((t0 + rows[:, None]) * H + i_h) * K + ck[None, :], mask=mb, other=0.0).to(tl.float32)
            b_b = tl.load(b_ptr + ((t0 + rows[:, None]) * H + i_h) * K + ck[None, :], mask=mb, other=0.0)
            q_r = tl.where(mi, q_i * tl.exp(b_i - r[None, :]), 0.0).to(dtype)
            k_r = tl.where(mb, k_b * tl.exp(r[None, :] - b_b), 0.0).to(dtype)
            acc += tl.dot(q_r, tl.trans(k_r))
            for j0 in range(0, BC, UNROLL):
                for u in tl.static_range(UNROLL):
                    j = j0 + u
                    s = i_i * BC + j
                    ms = ck < tl.where(s < L, K, 0)  # row s past the sequence loads nothing
                    k_s = tl.load(k_ptr + ((t0 + s) * H + i_h) * K + ck, mask=ms, other=0.0).to(tl.float32)
                    b_s = tl.load(b_ptr + ((t0 + s) * H + i_h) * K + ck, mask=ms, other=0.0)
                    pair = (rows_i >= s) & valid_i
                    e = tl.exp(tl.where(pair[:, None], b_i - b_s[None, :], float("-inf")))
                    a_s = tl.sum(q_i * k_s[None, :] * e, axis=1)
                    if SPLIT_DIAG:
                        diag += tl.where(cols_i[None, :] == j, a_s[:, None], 0.0)
                    else:
                        acc += tl.where(rows[None, :] == s, a_s[:, None], 0.0)
        row_ptr = a_ptr + ((t0 + rows_i[:, None]) * H + i_h) * BT
        if SPLIT_DIAG:
            # acc is zero from the diagonal block on, so the two stores cover disjoint columns.
            outside = (rows < i_i * BC) | (rows >= (i_i + 1) * BC)
            tl.store(row_ptr + rows[None, :], (acc * scale).to(a_ptr.dtype.element_ty),
                     mask=valid_i[:, None] & outside[None, :])
            tl.store(row_ptr + rows_i[None, :], (diag * scale).to(a_ptr.dtype.element_ty), mask=valid_i[:, None])
        else:
            tl.store(row_ptr + rows[None, :], (acc * scale).to(a_ptr.dtype.element_ty), mask=valid_i[:, None])


@triton.jit(do_not_specialize=["N"])
def chunk_gla_output_kernel(
    q_ptr, k_ptr, v_ptr, b_ptr, a_ptr, h_ptr, o_ptr, flag_ptr, cu_ptr, chunk_idx_ptr, N, scale,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    FORM_A: tl.constexpr, HEADS_FAST: tl.constexpr,
):
    """o = scale (q e^{b}) h + A v for one chunk and V tile (A already holds the scale).

    FORM_A: for a chunk whose flag is 1 (small gate spread, `chunk_cumsum_kernel`) the kernel
    forms A itself in its K loop, which loads q and b anyway, as `chunk_gla_scores_chunk_kernel`
    does (one product through the chunk's first row), and the first V tile's program writes it
    for the backward; other chunks' A comes from the 16-row-block kernel."""
    NV: tl.constexpr = (V + BV - 1) // BV
    i_x, i_h = chunk_head_ids(HEADS_FAST, False)
    i_c, i_v = i_x // NV, i_x % NV
    seq, t0, L = _chunk_bounds(cu_ptr, chunk_idx_ptr, i_c, N)
    if seq >= N:
        return
    dtype = q_ptr.dtype.element_ty
    rows = tl.arange(0, BT)
    valid = rows < L
    cv = i_v * BV + tl.arange(0, BV)
    mv = valid[:, None] & (cv[None, :] < V)
    o = tl.zeros([BT, BV], dtype=tl.float32)
    fast = False
    if FORM_A:
        fast = tl.load(flag_ptr + i_c * H + i_h) != 0
    acc = tl.zeros([BT, BT], dtype=tl.float32)
    for k0 in range(0, K, BK):
        ck = k0 + tl.arange(0, BK)
        mk = valid[:, None] & (ck[None, :] < K)
        q = tl.load(q_ptr + ((t0 + rows[:, None]) * H + i_h) * K + ck[None, :], mask=mk, other=0.0)
        b = tl.load(b_ptr + ((t0 + rows[:, None]) * H + i_h) * K + ck[None, :], mask=mk, other=0.0)
        h = tl.load(h_ptr + ((i_c.to(tl.int64) * H + i_h) * K + ck[:, None]) * V + cv[None, :],
                    mask=(ck[:, None] < K) & (cv[None, :] < V), other=0.0)
        qg = tl.where(mk, q.to(tl.float32) * tl.exp(b), 0.0).to(dtype)
        o += tl.dot(qg, h.to(dtype))
        if fast:
            k = tl.load(k_ptr + ((t0 + rows[:, None]) * H + i_h) * K + ck[None, :], mask=mk, other=0.0)
            acc += _scores_through_first_row(q, k, b, b_ptr, t0, i_h, ck, mk, H, K)
    a_tile = a_ptr + ((t0 + rows[:, None]) * H + i_h) * BT + rows[None, :]
    if fast:
        a = tl.where(rows[None, :] <= rows[:, None], acc * scale, 0.0).to(a_ptr.dtype.element_ty)
        if i_v == 0:
            tl.store(a_tile, a, mask=valid[:, None])
    else:
        a = tl.load(a_tile, mask=valid[:, None], other=0.0)
    v = tl.load(v_ptr + ((t0 + rows[:, None]) * H + i_h) * V + cv[None, :], mask=mv, other=0.0)
    o = o * scale + tl.dot(a.to(dtype), v)
    tl.store(o_ptr + ((t0 + rows[:, None]) * H + i_h) * V + cv[None, :], o.to(dtype), mask=mv)


@triton.jit(do_not_specialize=["N"])
def chunk_gla_dv_kernel(
    k_ptr, b_ptr, a_ptr, do_ptr, dh_ptr, dv_ptr, flag_ptr, cu_ptr, chunk_idx_ptr, N,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    MAX_SPREAD: tl.constexpr, HEADS_FAST: tl.constexpr,
):
    """dv = A^T do + (k e^{b_L - b}) dh for one chunk and V tile. The first V tile's program
    also records in flag[chunk, head] whether the chunk's gate spread is at most MAX_SPREAD
    (`_chunk_spread`, from the b tiles it loads anyway): the gradient kernel then forms the
    chunk's intra-chunk dq, dk itself, and the 16-row-block kernel skips it."""
    NV: tl.constexpr = (V + BV - 1) // BV
    i_x, i_h = chunk_head_ids(HEADS_FAST, False)
    i_c, i_v = i_x // NV, i_x % NV
    seq, t0, L = _chunk_bounds(cu_ptr, chunk_idx_ptr, i_c, N)
    if seq >= N:
        return
    dtype = k_ptr.dtype.element_ty
    rows = tl.arange(0, BT)
    valid = rows < L
    cv = i_v * BV + tl.arange(0, BV)
    mv = valid[:, None] & (cv[None, :] < V)
    dv = tl.zeros([BT, BV], dtype=tl.float32)
    spread = tl.zeros([BK], dtype=tl.float32)
    for k0 in range(0, K, BK):
        ck = k0 + tl.arange(0, BK)
        mk = valid[:, None] & (ck[None, :] < K)
        k = tl.load(k_ptr + ((t0 + rows[:, None]) * H + i_h) * K + ck[None, :], mask=mk, other=0.0)
        b = tl.load(b_ptr + ((t0 + rows[:, None]) * H + i_h) * K + ck[None, :], mask=mk, other=0.0)
        if i_v == 0:
            spread = tl.maximum(spread, _spread_of(b, mk))
        b_last = tl.load(b_ptr + ((t0 + L - 1) * H + i_h) * K + ck, mask=ck < K, other=0.0)
        dh = tl.load(dh_ptr + ((i_c.to(tl.int64) * H + i_h) * K + ck[:, None]) * V + cv[None, :],
                     mask=(ck[:, None] < K) & (cv[None, :] < V), other=0.0)
        kl = tl.where(mk, k.to(tl.float32) * tl.exp(b_last[None, :] - b), 0.0).to(dtype)
        dv += tl.dot(kl, dh.to(dtype))
    a = tl.load(a_ptr + ((t0 + rows[:, None]) * H + i_h) * BT + rows[None, :], mask=valid[:, None], other=0.0)
    do = tl.load(do_ptr + ((t0 + rows[:, None]) * H + i_h) * V + cv[None, :], mask=mv, other=0.0)
    dv += tl.dot(tl.trans(a.to(dtype)), do)
    tl.store(dv_ptr + ((t0 + rows[:, None]) * H + i_h) * V + cv[None, :], dv.to(dtype), mask=mv)
    if i_v == 0:
        tl.store(flag_ptr + i_c * H + i_h, (tl.max(spread, axis=0) <= MAX_SPREAD).to(tl.int32))


@triton.jit
def _partner_row(q_ptr, k_ptr, b_ptr, t0, s, L, i_h, ck, H: tl.constexpr, K: tl.constexpr):
    """Row s of the chunk: q_s, k_s (fp32) and b_s; zeros for a row past the sequence."""
    ms = ck < tl.where(s < L, K, 0)
    off = ((t0 + s) * H + i_h) * K + ck
    q_s = tl.load(q_ptr + off, mask=ms, other=0.0).to(tl.float32)
    k_s = tl.load(k_ptr + off, mask=ms, other=0.0).to(tl.float32)
    b_s = tl.load(b_ptr + off, mask=ms, other=0.0)
    return q_s, k_s, b_s


@triton.jit
def _da_partner(da_row, da_col, slot, rows, cols_i, s, j, SCRATCH: tl.constexpr, BC: tl.constexpr):
    """(dA[t, s] for t in the block, dA[s, u] for u in the block) of partner row s = block row j."""
    if SCRATCH:
        da_t = tl.load(slot + cols_i * BC + j)
        da_u = tl.load(slot + j * BC + cols_i)
    else:
        pick = rows[None, :] == s
        da_t = tl.sum(tl.where(pick, da_row, 0.0), axis=1)
        da_u = tl.sum(tl.where(pick, da_col, 0.0), axis=1)
    return da_t, da_u


@triton.jit
def _intra_grad_diag(q_ptr, k_ptr, b_ptr, da_row, da_col, slot, b_i, t0, L, i_i, i_h, ck,
                     H: tl.constexpr, K: tl.constexpr, BK: tl.constexpr,
                     UNROLL: tl.constexpr, SCRATCH: tl.constexpr):
    """dq, dk terms of the pairs inside block i, in tiles of their own (the layout of this
    elementwise math, not the dot layout). One exp per element serves both terms of a partner
    row s: e^{b_t - b_s} on rows t >= s (dq) and e^{b_s - b_u} on rows u <= s (dk), both
    exponents <= 0 where the masks keep them.
    """
    rows = tl.arange(0, BT)
    cols_i = tl.arange(0, BC)
    rows_i = i_i * BC + cols_i
    valid_i = rows_i < L
    dq = tl.zeros([BC, BK], dtype=tl.float32)
    dk = tl.zeros([BC, BK], dtype=tl.float32)
    for j0 in range(0, BC, UNROLL):
        for u in tl.static_range(UNROLL):
            j = j0 + u
            s = i_i * BC + j
            q_s, k_s, b_s = _partner_row(q_ptr, k_ptr, b_ptr, t0, s, L, i_h, ck, H, K)
            da_t, da_u = _da_partner(da_row, da_col, slot, rows, cols_i, s, j, SCRATCH, BC)
            later = (rows_i >= s) & valid_i
            earlier = (rows_i <= s) & (rows_i < tl.where(s < L, L, 0))
            e = tl.exp(tl.where((rows_i >= s)[:, None], b_i - b_s[None, :], b_s[None, :] - b_i))
            dq += da_t[:, None] * k_s[None, :] * tl.where(later[:, None], e, 0.0)
            dk += da_u[:, None] * q_s[None, :] * tl.where(earlier[:, None], e, 0.0)
    return dq, dk


@triton.jit(do_not_specialize=["N"])
def chunk_gla_intra_grad_kernel(
    q_ptr, k_ptr, v_ptr, b_ptr, do_ptr, dqi_ptr, dki_ptr, scratch_ptr, flag_ptr, cu_ptr, chunk_idx_ptr, N, scale,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    UNROLL: tl.constexpr, SCRATCH: tl.constexpr, SPLIT_DIAG: tl.constexpr,
    HEADS_FAST: tl.constexpr,
):
    """Intra-chunk dq, dk (fp32) of one chunk whose flag is 0 (`chunk_gla_dv_kernel`; the
    gradient kernel forms the others'), by BC-row blocks i, one after another, from
    dA = scale do v^T.

    dq_t = sum_{s <= t} dA_ts k_s e^{b_t - b_s}: keys before the block through its first row;
    dk_s = sum_{t >= s} dA_ts q_t e^{b_t - b_s}: queries after the block through its last row;
    pairs inside the block exact, one partner row at a time, UNROLL rows per loop step.
    Each partner row s needs column s and row s of the diagonal block of dA. By default they
    are picked out of the [BC, BT] dA tiles with a masked sum, a reduction across warps per
    row; with SCRATCH the [BC, BC] diagonal block is written once to this program's slot of
    scratch (fp32, BC * BC per program; it stays in cache) and read back by row and column.
    By default each row's terms are added to dq, dk in the dot layout (a layout conversion
    per row); SPLIT_DIAG sums them apart first (`_intra_grad_diag`), before the dots.
    """
    i_c, i_h = chunk_head_ids(HEADS_FAST, False)
    # The flag first: it needs no load of the chunk's bounds, and most chunks have it set.
    # (A slot past the last chunk may hold any flag; its bounds then say so.)
    if tl.load(flag_ptr + i_c * H + i_h) != 0:
        return
    seq, t0, L = _chunk_bounds(cu_ptr, chunk_idx_ptr, i_c, N)
    if seq >= N:
        return
    for i_i in range(0, tl.cdiv(L, BC)):  # the chunk's blocks, one after another
        dtype = q_ptr.dtype.element_ty
        rows = tl.arange(0, BT)
        cols_i = tl.arange(0, BC)
        rows_i = i_i * BC + cols_i
        valid = rows < L
        valid_i = rows_i < L
        before = rows < i_i * BC
        after = (rows >= (i_i + 1) * BC) & valid
        first_row = t0 + i_i * BC
        last_row = t0 + tl.minimum((i_i + 1) * BC, L) - 1

        da_row = tl.zeros([BC, BT], dtype=tl.float32)  # dA[t, s], t in the block
        da_col = tl.zeros([BC, BT], dtype=tl.float32)  # dA[t, s] at [s, t], s in the block
        for v0 in range(0, V, BV):
            cv = v0 + tl.arange(0, BV)
            mv_i = valid_i[:, None] & (cv[None, :] < V)
            mv = valid[:, None] & (cv[None, :] < V)
            do_i = tl.load(do_ptr + ((t0 + rows_i[:, None]) * H + i_h) * V + cv[None, :], mask=mv_i, other=0.0)
            v_i = tl.load(v_ptr + ((t0 + rows_i[:, None]) * H + i_h) * V + cv[None, :], mask=mv_i, other=0.0)
            do_a = tl.load(do_ptr + ((t0 + rows[:, None]) * H + i_h) * V + cv[None, :], mask=mv, other=0.0)
            v_a = tl.load(v_ptr + ((t0 + rows[:, None]) * H + i_h) * V + cv[None, :], mask=mv, other=0.0)
            da_row += tl.dot(do_i, tl.trans(v_a))
            da_col += tl.dot(v_i, tl.trans(do_a))
        da_row = da_row * scale
        da_col = da_col * scale
        da_before = tl.where(before[None, :], da_row, 0.0).to(dtype)
        da_after = tl.where(after[None, :], da_col, 0.0).to(dtype)
        slot = scratch_ptr + (tl.program_id(1).to(tl.int64) * tl.num_programs(0) + tl.program_id(0)) * (BC * BC)
        if SCRATCH:
            # The diagonal block of dA: the block's own columns of da_row.
            diag = (rows >= i_i * BC) & (rows < (i_i + 1) * BC)
            tl.store(slot + cols_i[:, None] * BC + (rows - i_i * BC)[None, :], da_row, mask=diag[None, :])
            tl.debug_barrier()  # every thread reads entries other threads wrote

        for k0 in range(0, K, BK):
            ck = k0 + tl.arange(0, BK)
            mck = ck < K
            mi = valid_i[:, None] & mck[None, :]
            b_i = tl.load(b_ptr + ((t0 + rows_i[:, None]) * H + i_h) * K + ck[None, :], mask=mi, other=0.0)
            if SPLIT_DIAG:  # first, so that the dot results are not live across its loop
                dq_d, dk_d = _intra_grad_diag(q_ptr, k_ptr, b_ptr, da_row, da_col, slot, b_i, t0, L, i_i, i_h, ck,
                                              H, K, BK, UNROLL, SCRATCH)
            r1 = tl.load(b_ptr + (first_row * H + i_h) * K + ck, mask=mck, other=0.0)
            r2 = tl.load(b_ptr + (last_row * H + i_h) * K + ck, mask=mck, other=0.0)
            mb = before[:, None] & mck[None, :]
            k_b = tl.load(k_ptr + ((t0 + rows[:, None]) * H + i_h) * K + ck[None, :], mask=mb, other=0.0).to(tl.float32)
            b_b = tl.load(b_ptr + ((t0 + rows[:, None]) * H + i_h) * K + ck[None, :], mask=mb, other=0.0)
            k_r = tl.where(mb, k_b * tl.exp(r1[None, :] - b_b), 0.0).to(dtype)
            dq = tl.where(mi, tl.dot(da_before, k_r) * tl.exp(b_i - r1[None, :]), 0.0)
            ma = after[:, None] & mck[None, :]
            q_a = tl.load(q_ptr + ((t0 + rows[:, None]) * H + i_h) * K + ck[None, :], mask=ma, other=0.0).to(tl.float32)
            b_a = tl.load(b_ptr + ((t0 + rows[:, None]) * H + i_h) * K + ck[None, :], mask=ma, other=0.0)
            q_r = tl.where(ma, q_a * tl.exp(b_a - r2[None, :]), 0.0).to(dtype)
            dk = tl.where(mi, tl.dot(da_after, q_r) * tl.exp(r2[None, :] - b_i), 0.0)
            if SPLIT_DIAG:
                dq += dq_d
                dk += dk_d
            else:
                for j0 in range(0, BC, UNROLL):
                    for u in tl.static_range(UNROLL):
                        j = j0 + u
                        s = i_i * BC + j
                        in_seq = s < L
                        ms = ck < tl.where(in_seq, K, 0)  # row s past the sequence loads nothing
                        k_s = tl.load(k_ptr + ((t0 + s) * H + i_h) * K + ck, mask=ms, other=0.0).to(tl.float32)
                        q_s = tl.load(q_ptr + ((t0 + s) * H + i_h) * K + ck, mask=ms, other=0.0).to(tl.float32)
                        b_s = tl.load(b_ptr + ((t0 + s) * H + i_h) * K + ck, mask=ms, other=0.0)
                        da_t, da_u = _da_partner(da_row, da_col, slot, rows, cols_i, s, j, SCRATCH, BC)
                        later = (rows_i >= s) & valid_i
                        earlier = (rows_i <= s) & (rows_i < tl.where(in_seq, L, 0))
                        e_q = tl.exp(tl.where(later[:, None], b_i - b_s[None, :], float("-inf")))
                        e_k = tl.exp(tl.where(earlier[:, None], b_s[None, :] - b_i, float("-inf")))
                        dq += da_t[:, None] * k_s[None, :] * e_q
                        dk += da_u[:, None] * q_s[None, :] * e_k
            p = ((t0 + rows_i[:, None]) * H + i_h) * K + ck[None, :]
            tl.store(dqi_ptr + p, dq, mask=mi)
            tl.store(dki_ptr + p, dk, mask=mi)
        if SCRATCH:
            tl.debug_barrier()  # the next block rewrites the scratch slot


@triton.jit(do_not_specialize=["N"])
def chunk_gla_grad_kernel(
    q_ptr, k_ptr, v_ptr, b_ptr, do_ptr, h_ptr, dh_ptr, dqi_ptr, dki_ptr, dq_ptr, dk_ptr, dg_ptr, flag_ptr,
    cu_ptr, chunk_idx_ptr, N, scale,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    DOTS_16BIT: tl.constexpr, HEADS_FAST: tl.constexpr,
):
    """dq, dk and dg of one chunk and K tile: inter-chunk terms as whole-chunk matmuls plus the
    intra-chunk parts, then the gate gradient.

    dq = scale e^{b} (do h^T) + dq_intra; dk = e^{b_L - b} (v dh^T) + dk_intra. The gradient of
    b is q dq - k dk per row, plus, at the last row, sum_s k_s dk_inter_s + e^{b_L} rowsum(h dh)
    (through the state leaving the chunk); dg is its reverse cumulative sum over the chunk.

    dq_intra, dk_intra come from the 16-row-block kernel, or for a chunk of small gate spread
    (flag 1, `chunk_gla_dv_kernel`) from dA = scale do v^T, formed in the V loop, through the
    chunk's first row r and last row l: dq_intra = e^{b - r} (dA_lower (k e^{r - b})) and
    dk_intra = e^{l - b} (dA_lower^T (q e^{b - l})), every factor within e^{+-MAX_SPREAD}.
    With DOTS_16BIT both products take q's dtype as operands (16-bit on GPUs), both through r,
    and the intra-chunk part of b's gradient is formed from those operands; else fp32 (tf32).
    """
    NK: tl.constexpr = (K + BK - 1) // BK
    i_x, i_h = chunk_head_ids(HEADS_FAST, False)
    i_c, i_k = i_x // NK, i_x % NK
    seq, t0, L = _chunk_bounds(cu_ptr, chunk_idx_ptr, i_c, N)
    if seq >= N:
        return
    dtype = q_ptr.dtype.element_ty
    rows = tl.arange(0, BT)
    valid = rows < L
    ck = i_k * BK + tl.arange(0, BK)
    mk = valid[:, None] & (ck[None, :] < K)
    dq = tl.zeros([BT, BK], dtype=tl.float32)
    dk = tl.zeros([BT, BK], dtype=tl.float32)
    hdh = tl.zeros([BK], dtype=tl.float32)
    fast = tl.load(flag_ptr + i_c * H + i_h) != 0
    da = tl.zeros([BT, BT], dtype=tl.float32)
    for v0 in range(0, V, BV):
        cv = v0 + tl.arange(0, BV)
        mv = valid[:, None] & (cv[None, :] < V)
        mkv = (ck[:, None] < K) & (cv[None, :] < V)
        do = tl.load(do_ptr + ((t0 + rows[:, None]) * H + i_h) * V + cv[None, :], mask=mv, other=0.0)
        v = tl.load(v_ptr + ((t0 + rows[:, None]) * H + i_h) * V + cv[None, :], mask=mv, other=0.0)
        h = tl.load(h_ptr + ((i_c.to(tl.int64) * H + i_h) * K + ck[:, None]) * V + cv[None, :], mask=mkv, other=0.0)
        dh = tl.load(dh_ptr + ((i_c.to(tl.int64) * H + i_h) * K + ck[:, None]) * V + cv[None, :], mask=mkv, other=0.0)
        dq += tl.dot(do, tl.trans(h.to(dtype)))
        dk += tl.dot(v, tl.trans(dh.to(dtype)))
        hdh += tl.sum(h.to(tl.float32) * dh.to(tl.float32), axis=1)
        if fast:
            da += tl.dot(do, tl.trans(v))
    p = ((t0 + rows[:, None]) * H + i_h) * K + ck[None, :]
    b = tl.load(b_ptr + p, mask=mk, other=0.0)
    b_last = tl.load(b_ptr + ((t0 + L - 1) * H + i_h) * K + ck, mask=ck < K, other=0.0)
    q = tl.load(q_ptr + p, mask=mk, other=0.0).to(tl.float32)
    k = tl.load(k_ptr + p, mask=mk, other=0.0).to(tl.float32)
    dq = tl.where(mk, dq * tl.exp(b) * scale, 0.0)
    dk = tl.where(mk, dk * tl.exp(b_last[None, :] - b), 0.0)
    dbl = tl.sum(k * dk, axis=0) + tl.exp(b_last) * hdh
    # db, the gradient of b: on the 16-bit path its inter-chunk terms first and the intra-chunk
    # ones from the rounded operands below; on the fp32 path from the finished dq, dk after the
    # branch, which keeps that path at 255 registers without spills (formed first, it spilled).
    if DOTS_16BIT:
        db = q * dq - k * dk
    if fast:
        r = tl.load(b_ptr + (t0 * H + i_h) * K + ck, mask=ck < K, other=0.0)
        da = tl.where(rows[None, :] <= rows[:, None], da * scale, 0.0)  # dA[t, s], s <= t
        if DOTS_16BIT:
            # Both products take the same rounded operands, q e^{b - r} and k e^{r - b}, and the
            # intra-chunk part of db is formed from them: each pair (t, s) then adds the same
            # rounded term to row t's q.dq as to row s's k.dk, so those terms cancel over the
            # chunk as the exact ones do, and the reverse cumulative sum of db leaves no rounding
            # of theirs behind.
            q_r = tl.where(mk, q * tl.exp(b - r[None, :]), 0.0).to(dtype)
            k_r = tl.where(mk, k * tl.exp(r[None, :] - b), 0.0).to(dtype)
            da16 = da.to(dtype)
            dq_r = tl.dot(da16, k_r)
            dk_r = tl.dot(tl.trans(da16), q_r)
            db += q_r.to(tl.float32) * dq_r - k_r.to(tl.float32) * dk_r
            dq += tl.where(mk, dq_r * tl.exp(b - r[None, :]), 0.0)
            dk += tl.where(mk, dk_r * tl.exp(r[None, :] - b), 0.0)
        else:
            k_r = tl.where(mk, k * tl.exp(r[None, :] - b), 0.0)
            dq += tl.where(mk, tl.dot(da, k_r) * tl.exp(b - r[None, :]), 0.0)
            q_l = tl.where(mk, q * tl.exp(b - b_last[None, :]), 0.0)
            dk += tl.where(mk, tl.dot(tl.trans(da), q_l) * tl.exp(b_last[None, :] - b), 0.0)
    else:
        dq_intra = tl.load(dqi_ptr + p, mask=mk, other=0.0)
        dk_intra = tl.load(dki_ptr + p, mask=mk, other=0.0)
        if DOTS_16BIT:
            db += q * dq_intra - k * dk_intra
        dq += dq_intra
        dk += dk_intra
    if not DOTS_16BIT:
        db = q * dq - k * dk
    dg = tl.sum(db, axis=0)[None, :] - tl.cumsum(db, axis=0) + db + dbl[None, :]
    tl.store(dq_ptr + p, dq.to(dtype), mask=mk)
    tl.store(dk_ptr + p, dk.to(dtype), mask=mk)
    tl.store(dg_ptr + p, dg.to(dg_ptr.dtype.element_ty), mask=mk)
