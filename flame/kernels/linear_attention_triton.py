"""Triton kernels of chunked gated linear attention (imports only triton).

Sequences are cut into chunks of BT = 64 tokens; every kernel but the state scan is
parallel over chunks. Notation inside a chunk of L valid rows: b = cumulative sum of the
log decay g (fp32, per key dimension; a scalar gate is broadcast over K), b_L its last row,
h_n the state entering chunk n, dh_n the gradient of the state leaving chunk n.

    o_t    = scale * [(q_t * e^{b_t}) h_n + sum_{s<=t} (sum_k q_tk k_sk e^{b_tk - b_sk}) v_s]
    h_n+1  = e^{b_L} * h_n + (k * e^{b_L - b})^T v

The intra-chunk term is done per sub-chunk of BC = 16 rows ("secondary chunking"): for
pairs of positions in different sub-chunks the decay factors through a reference row r
between them, e^{b_t - r} * e^{r - b_s}, both exponents <= 0 so nothing overflows and the
product is a tensor-core matmul; within a sub-chunk the decay is formed exactly per pair
(per key dimension for GLA; one [BC, BC] matrix and a matmul for a scalar gate).

Grids are sized by an upper bound on the number of chunks (no host synchronisation);
programs whose chunk slot lies past the real chunks return at once.
"""

import triton
import triton.language as tl

CHUNK_SIZE = 64
SUB_CHUNK_SIZE = 16
BT = tl.constexpr(CHUNK_SIZE)
BC = tl.constexpr(SUB_CHUNK_SIZE)


@triton.jit
def _chunk_bounds(cu_ptr, chunk_idx_ptr, i_c, N):
    """(sequence, first token, valid rows) of chunk slot i_c; sequence == N past the end."""
    seq = tl.load(chunk_idx_ptr + 2 * i_c)
    chunk = tl.load(chunk_idx_ptr + 2 * i_c + 1)
    seq_c = tl.minimum(seq, N - 1)
    # 64-bit token offsets: T * H * D passes 2^31 for long packed batches.
    bos = tl.load(cu_ptr + seq_c).to(tl.int64)
    eos = tl.load(cu_ptr + seq_c + 1).to(tl.int64)
    t0 = bos + chunk * BT
    L = tl.minimum(eos - t0, BT).to(tl.int32)
    return seq, t0, L


@triton.jit
def _b_offsets(t, i_h, ck, H: tl.constexpr, K: tl.constexpr, SCALAR_GATE: tl.constexpr):
    """Offsets into b: [T, H] for a scalar gate (broadcast over the key columns ck), else [T, H, K]."""
    if SCALAR_GATE:
        return t * H + i_h + ck * 0
    else:
        return (t * H + i_h) * K + ck


@triton.jit
def chunk_cumsum_kernel(
    g_ptr, b_ptr, cu_ptr, chunk_idx_ptr, N,
    H: tl.constexpr, K: tl.constexpr, SCALAR_GATE: tl.constexpr, BK: tl.constexpr,
):
    """b = chunk-local inclusive cumulative sum of g, fp32 [T, H] or [T, H, K]."""
    i_c, i_h, i_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    seq, t0, L = _chunk_bounds(cu_ptr, chunk_idx_ptr, i_c, N)
    if seq >= N:
        return
    rows = tl.arange(0, BT)
    if SCALAR_GATE:
        g = tl.load(g_ptr + (t0 + rows) * H + i_h, mask=rows < L, other=0.0)
        b = tl.cumsum(g.to(tl.float32), axis=0)
        tl.store(b_ptr + (t0 + rows) * H + i_h, b, mask=rows < L)
    else:
        cols = i_k * BK + tl.arange(0, BK)
        mask = (rows[:, None] < L) & (cols[None, :] < K)
        g = tl.load(g_ptr + ((t0 + rows[:, None]) * H + i_h) * K + cols[None, :], mask=mask, other=0.0)
        b = tl.cumsum(g.to(tl.float32), axis=0)
        tl.store(b_ptr + ((t0 + rows[:, None]) * H + i_h) * K + cols[None, :], b, mask=mask)


@triton.jit
def _state_pass(
    x_ptr, y_ptr, b_ptr, start_ptr, states_ptr, end_ptr, i_n, i_h, i_k, i_v, bos, eos, first, num_chunks, scale,
    SCALAR_GATE: tl.constexpr, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    REVERSE: tl.constexpr, HAS_START: tl.constexpr, STORE_END: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
):
    """One [BK, BV] tile of the recurrence over a sequence's chunks, state kept in fp32 registers.

    Forward (x, y = k, v): states[c] = h entering chunk c; h <- e^{b_L} h + (k e^{b_L - b})^T v.
    REVERSE (x, y = q, do): states[c] = dh leaving chunk c; dh <- e^{b_L} dh + scale (q e^{b})^T do.
    The chunk tiles do not depend on h, so their loads are pipelined ahead of the update.
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
        x = tl.load(x_ptr + ((t0 + rows[:, None]) * H + i_h) * K + ck[None, :], mask=mk, other=0.0)
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


@triton.jit
def chunk_state_kernel(
    k_ptr, v_ptr, q_ptr, do_ptr, b_ptr, h0_ptr, dht_ptr, h_ptr, dh_ptr, ht_ptr, dh0_ptr,
    cu_ptr, chunk_offsets_ptr, N, scale,
    SCALAR_GATE: tl.constexpr, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
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
                    num_chunks, scale, SCALAR_GATE, H, K, V, True, HAS_DHT, STORE_DH0, BK, BV)
    else:
        _state_pass(k_ptr, v_ptr, b_ptr, h0_ptr, h_ptr, ht_ptr, i_n, i_h, i_k, i_v, bos, eos, first,
                    num_chunks, 1.0, SCALAR_GATE, H, K, V, False, HAS_H0, STORE_HT, BK, BV)


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
def chunk_output_scalar_kernel(
    q_ptr, k_ptr, v_ptr, b_ptr, h_ptr, o_ptr, cu_ptr, chunk_idx_ptr, N, scale,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
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
        q = tl.load(q_ptr + ((t0 + rows[:, None]) * H + i_h) * K + ck[None, :], mask=mk, other=0.0)
        k = tl.load(k_ptr + ((t0 + rows[:, None]) * H + i_h) * K + ck[None, :], mask=mk, other=0.0)
        h = tl.load(h_ptr + ((i_c.to(tl.int64) * H + i_h) * K + ck[:, None]) * V + cv[None, :],
                    mask=(ck[:, None] < K) & (cv[None, :] < V), other=0.0)
        a += tl.dot(q, tl.trans(k))
        o += tl.dot(q, h.to(dtype))
    a = (a * _decay_matrix(b, rows, L, False)).to(dtype)
    v = tl.load(v_ptr + ((t0 + rows[:, None]) * H + i_h) * V + cv[None, :], mask=mv, other=0.0)
    o = o * tl.exp(b)[:, None] + tl.dot(a, v)
    tl.store(o_ptr + ((t0 + rows[:, None]) * H + i_h) * V + cv[None, :], (o * scale).to(dtype), mask=mv)


@triton.jit
def chunk_backward_dv_scalar_kernel(
    q_ptr, k_ptr, b_ptr, do_ptr, dh_ptr, dv_ptr, cu_ptr, chunk_idx_ptr, N, scale,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
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
        q = tl.load(q_ptr + ((t0 + rows[:, None]) * H + i_h) * K + ck[None, :], mask=mk, other=0.0)
        k = tl.load(k_ptr + ((t0 + rows[:, None]) * H + i_h) * K + ck[None, :], mask=mk, other=0.0)
        dh = tl.load(dh_ptr + ((i_c.to(tl.int64) * H + i_h) * K + ck[:, None]) * V + cv[None, :],
                     mask=(ck[:, None] < K) & (cv[None, :] < V), other=0.0)
        at += tl.dot(k, tl.trans(q))
        dv += tl.dot(k, dh.to(dtype))
    at = (at * _decay_matrix(b, rows, L, True) * scale).to(dtype)
    do = tl.load(do_ptr + ((t0 + rows[:, None]) * H + i_h) * V + cv[None, :], mask=mv, other=0.0)
    dv = dv * tl.where(valid, tl.exp(b_last - b), 0.0)[:, None] + tl.dot(at, do)
    tl.store(dv_ptr + ((t0 + rows[:, None]) * H + i_h) * V + cv[None, :], dv.to(dtype), mask=mv)


@triton.jit
def chunk_backward_dqk_scalar_kernel(
    q_ptr, k_ptr, v_ptr, b_ptr, do_ptr, h_ptr, dh_ptr, dq_ptr, dk_ptr, db_ptr, dbl_ptr,
    cu_ptr, chunk_idx_ptr, N, T_total, scale,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
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
    q = tl.load(q_ptr + ((t0 + rows[:, None]) * H + i_h) * K + ck[None, :], mask=mk, other=0.0)
    k = tl.load(k_ptr + ((t0 + rows[:, None]) * H + i_h) * K + ck[None, :], mask=mk, other=0.0)
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


@triton.jit
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
    dg = tl.sum(db, axis=0) - tl.cumsum(db, axis=0) + db + dbl
    tl.store(dg_ptr + (t0 + rows) * H + i_h, dg.to(dg_ptr.dtype.element_ty), mask=rows < L)


@triton.jit
def _diag_decay(b_i, rows_i, L):
    """Exact within-sub-chunk decay e^{b_t - b_s} for t >= s, [BC, BC, BK] (zero elsewhere)."""
    causal = (rows_i[:, None] >= rows_i[None, :]) & (rows_i[:, None] < L)
    diff = b_i[:, None, :] - b_i[None, :, :]
    return tl.where(causal[:, :, None], tl.exp(diff), 0.0)


@triton.jit
def _diag_decay_scalar(b_ptr, t0, rows_i, L, i_h, H: tl.constexpr):
    """The same for a scalar gate: one [BC, BC] decay shared by all key dimensions."""
    b_rows = tl.load(b_ptr + (t0 + rows_i) * H + i_h, mask=rows_i < L, other=0.0)
    causal = (rows_i[:, None] >= rows_i[None, :]) & (rows_i[:, None] < L)
    return tl.where(causal, tl.exp(b_rows[:, None] - b_rows[None, :]), 0.0)


@triton.jit
def chunk_output_kernel(
    q_ptr, k_ptr, v_ptr, b_ptr, h_ptr, o_ptr, cu_ptr, chunk_idx_ptr, N, scale,
    SCALAR_GATE: tl.constexpr, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
):
    """Output rows of one sub-chunk: inter-chunk term from h plus the intra-chunk term.

    The sub-chunks of a chunk are adjacent programs, so they share its state tile in L2.
    """
    NC: tl.constexpr = BT // BC
    i_c, i_i, i_h = tl.program_id(0) // NC, tl.program_id(0) % NC, tl.program_id(1)
    seq, t0, L = _chunk_bounds(cu_ptr, chunk_idx_ptr, i_c, N)
    if seq >= N:
        return
    if i_i * BC >= L:
        return
    dtype = q_ptr.dtype.element_ty
    rows = tl.arange(0, BT)
    rows_i = i_i * BC + tl.arange(0, BC)
    before = rows < i_i * BC
    ref_row = t0 + i_i * BC  # reference: first row of the sub-chunk
    p_off = tl.zeros([BC, BT], dtype=tl.float32)
    p_diag = tl.zeros([BC, BC], dtype=tl.float32)
    for k0 in range(0, K, BK):
        ck = k0 + tl.arange(0, BK)
        mi = (rows_i[:, None] < L) & (ck[None, :] < K)
        mb = before[:, None] & (ck[None, :] < K)
        q_i = tl.load(q_ptr + ((t0 + rows_i[:, None]) * H + i_h) * K + ck[None, :], mask=mi, other=0.0).to(tl.float32)
        k_i = tl.load(k_ptr + ((t0 + rows_i[:, None]) * H + i_h) * K + ck[None, :], mask=mi, other=0.0).to(tl.float32)
        b_i = tl.load(b_ptr + _b_offsets(t0 + rows_i[:, None], i_h, ck[None, :], H, K, SCALAR_GATE), mask=mi, other=0.0)
        k_b = tl.load(k_ptr + ((t0 + rows[:, None]) * H + i_h) * K + ck[None, :], mask=mb, other=0.0).to(tl.float32)
        b_b = tl.load(b_ptr + _b_offsets(t0 + rows[:, None], i_h, ck[None, :], H, K, SCALAR_GATE), mask=mb, other=0.0)
        r = tl.load(b_ptr + _b_offsets(ref_row, i_h, ck, H, K, SCALAR_GATE), mask=ck < K, other=0.0)
        q_r = tl.where(mi, q_i * tl.exp(b_i - r[None, :]), 0.0).to(dtype)
        k_r = tl.where(mb, k_b * tl.exp(r[None, :] - b_b), 0.0).to(dtype)
        p_off += tl.dot(q_r, tl.trans(k_r))
        if SCALAR_GATE:
            e = _diag_decay_scalar(b_ptr, t0, rows_i, L, i_h, H)
            p_diag += tl.dot(q_i.to(dtype), tl.trans(k_i.to(dtype))) * e
        else:
            e = _diag_decay(b_i, rows_i, L)
            p_diag += tl.sum(q_i[:, None, :] * k_i[None, :, :] * e, axis=2)
    p_off = p_off.to(dtype)
    p_diag = p_diag.to(dtype)
    for v0 in range(0, V, BV):
        cv = v0 + tl.arange(0, BV)
        v_b = tl.load(v_ptr + ((t0 + rows[:, None]) * H + i_h) * V + cv[None, :],
                      mask=before[:, None] & (cv[None, :] < V), other=0.0)
        v_i = tl.load(v_ptr + ((t0 + rows_i[:, None]) * H + i_h) * V + cv[None, :],
                      mask=(rows_i[:, None] < L) & (cv[None, :] < V), other=0.0)
        o = tl.dot(p_off, v_b) + tl.dot(p_diag, v_i)
        for k0 in range(0, K, BK):
            ck = k0 + tl.arange(0, BK)
            mi = (rows_i[:, None] < L) & (ck[None, :] < K)
            q_i = tl.load(q_ptr + ((t0 + rows_i[:, None]) * H + i_h) * K + ck[None, :], mask=mi, other=0.0)
            b_i = tl.load(b_ptr + _b_offsets(t0 + rows_i[:, None], i_h, ck[None, :], H, K, SCALAR_GATE), mask=mi, other=0.0)
            q_g = tl.where(mi, q_i.to(tl.float32) * tl.exp(b_i), 0.0).to(dtype)
            h = tl.load(h_ptr + ((i_c.to(tl.int64) * H + i_h) * K + ck[:, None]) * V + cv[None, :],
                        mask=(ck[:, None] < K) & (cv[None, :] < V), other=0.0)
            o += tl.dot(q_g, h.to(dtype))
        tl.store(o_ptr + ((t0 + rows_i[:, None]) * H + i_h) * V + cv[None, :], (o * scale).to(dtype),
                 mask=(rows_i[:, None] < L) & (cv[None, :] < V))


@triton.jit
def chunk_backward_kernel(
    q_ptr, k_ptr, v_ptr, b_ptr, do_ptr, h_ptr, dh_ptr,
    dq_ptr, dk_ptr, dv_ptr, db_ptr, dbl_ptr, cu_ptr, chunk_idx_ptr, N, scale,
    SCALAR_GATE: tl.constexpr, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
):
    """dq, dk, dv and db (gradient of the cumulative log decay) of one sub-chunk's rows.

    dbl_ptr [slots, BT // BC, H, K] gets this sub-chunk's part of the gradient of b_L that
    comes through the state leaving the chunk; the dg kernel adds it to every row.
    """
    NC: tl.constexpr = BT // BC
    i_c, i_i, i_h = tl.program_id(0) // NC, tl.program_id(0) % NC, tl.program_id(1)
    seq, t0, L = _chunk_bounds(cu_ptr, chunk_idx_ptr, i_c, N)
    if seq >= N:
        return
    if i_i * BC >= L:
        return
    dtype = q_ptr.dtype.element_ty
    rows = tl.arange(0, BT)
    rows_i = i_i * BC + tl.arange(0, BC)
    valid = rows < L
    valid_i = rows_i < L
    before = rows < i_i * BC
    after = (rows >= (i_i + 1) * BC) & valid
    first_row = t0 + i_i * BC  # reference for pairs (t in this sub-chunk, s before it)
    last_row = t0 + tl.minimum((i_i + 1) * BC, L) - 1  # reference for (t after, s in it)
    end_row = t0 + L - 1
    first_sub = (i_i == 0).to(tl.float32)

    # Gradients of the intra-chunk scores: dA[t, s] = do_t . v_s.
    da_row = tl.zeros([BC, BT], dtype=tl.float32)  # t in sub-chunk, s before it
    da_col = tl.zeros([BC, BT], dtype=tl.float32)  # s in sub-chunk, t after it (transposed)
    da_diag = tl.zeros([BC, BC], dtype=tl.float32)  # t, s both in it
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
        da_diag += tl.dot(do_i, tl.trans(v_i))
    da_row = tl.where(before[None, :], da_row, 0.0).to(dtype)
    da_col = tl.where(after[None, :], da_col, 0.0).to(dtype)
    causal = (rows_i[:, None] >= rows_i[None, :]) & valid_i[:, None]
    da_diag = tl.where(causal, da_diag, 0.0)

    # Scores with this sub-chunk's keys, for dv: at[s, t] = A[t, s] for t after, a_diag[t, s].
    at_off = tl.zeros([BC, BT], dtype=tl.float32)
    a_diag = tl.zeros([BC, BC], dtype=tl.float32)
    for k0 in range(0, K, BK):
        ck = k0 + tl.arange(0, BK)
        mi = valid_i[:, None] & (ck[None, :] < K)
        ma = after[:, None] & (ck[None, :] < K)
        q_i = tl.load(q_ptr + ((t0 + rows_i[:, None]) * H + i_h) * K + ck[None, :], mask=mi, other=0.0).to(tl.float32)
        k_i = tl.load(k_ptr + ((t0 + rows_i[:, None]) * H + i_h) * K + ck[None, :], mask=mi, other=0.0).to(tl.float32)
        b_i = tl.load(b_ptr + _b_offsets(t0 + rows_i[:, None], i_h, ck[None, :], H, K, SCALAR_GATE), mask=mi, other=0.0)
        q_a = tl.load(q_ptr + ((t0 + rows[:, None]) * H + i_h) * K + ck[None, :], mask=ma, other=0.0).to(tl.float32)
        b_a = tl.load(b_ptr + _b_offsets(t0 + rows[:, None], i_h, ck[None, :], H, K, SCALAR_GATE), mask=ma, other=0.0)
        r = tl.load(b_ptr + _b_offsets(last_row, i_h, ck, H, K, SCALAR_GATE), mask=(ck < K), other=0.0)
        k_r = tl.where(mi, k_i * tl.exp(r[None, :] - b_i), 0.0).to(dtype)
        q_r = tl.where(ma, q_a * tl.exp(b_a - r[None, :]), 0.0).to(dtype)
        at_off += tl.dot(k_r, tl.trans(q_r))
        if SCALAR_GATE:
            e = _diag_decay_scalar(b_ptr, t0, rows_i, L, i_h, H)
            a_diag += tl.dot(q_i.to(dtype), tl.trans(k_i.to(dtype))) * e
        else:
            e = _diag_decay(b_i, rows_i, L)
            a_diag += tl.sum(q_i[:, None, :] * k_i[None, :, :] * e, axis=2)
    at_off = at_off.to(dtype)
    at_diag = tl.trans(a_diag).to(dtype)

    for v0 in range(0, V, BV):
        cv = v0 + tl.arange(0, BV)
        mv_i = valid_i[:, None] & (cv[None, :] < V)
        do_i = tl.load(do_ptr + ((t0 + rows_i[:, None]) * H + i_h) * V + cv[None, :], mask=mv_i, other=0.0)
        do_a = tl.load(do_ptr + ((t0 + rows[:, None]) * H + i_h) * V + cv[None, :],
                       mask=after[:, None] & (cv[None, :] < V), other=0.0)
        dv = (tl.dot(at_off, do_a) + tl.dot(at_diag, do_i)) * scale
        for k0 in range(0, K, BK):
            ck = k0 + tl.arange(0, BK)
            mi = valid_i[:, None] & (ck[None, :] < K)
            k_i = tl.load(k_ptr + ((t0 + rows_i[:, None]) * H + i_h) * K + ck[None, :], mask=mi, other=0.0)
            b_i = tl.load(b_ptr + _b_offsets(t0 + rows_i[:, None], i_h, ck[None, :], H, K, SCALAR_GATE), mask=mi, other=0.0)
            b_l = tl.load(b_ptr + _b_offsets(end_row, i_h, ck, H, K, SCALAR_GATE), mask=ck < K, other=0.0)
            k_l = tl.where(mi, k_i.to(tl.float32) * tl.exp(b_l[None, :] - b_i), 0.0).to(dtype)
            dh = tl.load(dh_ptr + ((i_c.to(tl.int64) * H + i_h) * K + ck[:, None]) * V + cv[None, :],
                         mask=(ck[:, None] < K) & (cv[None, :] < V), other=0.0)
            dv += tl.dot(k_l, dh.to(dtype))
        tl.store(dv_ptr + ((t0 + rows_i[:, None]) * H + i_h) * V + cv[None, :], dv.to(dtype), mask=mv_i)

    for k0 in range(0, K, BK):
        ck = k0 + tl.arange(0, BK)
        mi = valid_i[:, None] & (ck[None, :] < K)
        dq = tl.zeros([BC, BK], dtype=tl.float32)  # do h^T, decayed below
        dk = tl.zeros([BC, BK], dtype=tl.float32)  # v dh^T, decayed below
        hdh = tl.zeros([BK], dtype=tl.float32)  # rowsum(h * dh)
        for v0 in range(0, V, BV):
            cv = v0 + tl.arange(0, BV)
            mv_i = valid_i[:, None] & (cv[None, :] < V)
            mkv = (ck[:, None] < K) & (cv[None, :] < V)
            do_i = tl.load(do_ptr + ((t0 + rows_i[:, None]) * H + i_h) * V + cv[None, :], mask=mv_i, other=0.0)
            v_i = tl.load(v_ptr + ((t0 + rows_i[:, None]) * H + i_h) * V + cv[None, :], mask=mv_i, other=0.0)
            h = tl.load(h_ptr + ((i_c.to(tl.int64) * H + i_h) * K + ck[:, None]) * V + cv[None, :], mask=mkv, other=0.0)
            dh = tl.load(dh_ptr + ((i_c.to(tl.int64) * H + i_h) * K + ck[:, None]) * V + cv[None, :], mask=mkv, other=0.0)
            dq += tl.dot(do_i, tl.trans(h.to(dtype)))
            dk += tl.dot(v_i, tl.trans(dh.to(dtype)))
            hdh += tl.sum(h.to(tl.float32) * dh.to(tl.float32), axis=1)
        q_i = tl.load(q_ptr + ((t0 + rows_i[:, None]) * H + i_h) * K + ck[None, :], mask=mi, other=0.0).to(tl.float32)
        k_i = tl.load(k_ptr + ((t0 + rows_i[:, None]) * H + i_h) * K + ck[None, :], mask=mi, other=0.0).to(tl.float32)
        b_i = tl.load(b_ptr + _b_offsets(t0 + rows_i[:, None], i_h, ck[None, :], H, K, SCALAR_GATE), mask=mi, other=0.0)
        b_l = tl.load(b_ptr + _b_offsets(end_row, i_h, ck, H, K, SCALAR_GATE), mask=ck < K, other=0.0)
        dq = tl.where(mi, dq * tl.exp(b_i), 0.0)
        dk = tl.where(mi, dk * tl.exp(b_l[None, :] - b_i), 0.0)
        dbl = tl.sum(k_i * dk, axis=0) + first_sub * tl.exp(b_l) * hdh
        # Pairs with s before this sub-chunk, through the reference at its first row.
        mb = before[:, None] & (ck[None, :] < K)
        k_b = tl.load(k_ptr + ((t0 + rows[:, None]) * H + i_h) * K + ck[None, :], mask=mb, other=0.0).to(tl.float32)
        b_b = tl.load(b_ptr + _b_offsets(t0 + rows[:, None], i_h, ck[None, :], H, K, SCALAR_GATE), mask=mb, other=0.0)
        r1 = tl.load(b_ptr + _b_offsets(first_row, i_h, ck, H, K, SCALAR_GATE), mask=(ck < K), other=0.0)
        k_r = tl.where(mb, k_b * tl.exp(r1[None, :] - b_b), 0.0).to(dtype)
        dq_intra = tl.dot(da_row, k_r)
        dq_intra = tl.where(mi, dq_intra * tl.exp(b_i - r1[None, :]), 0.0)
        # Pairs with t after this sub-chunk, through the reference at its last row.
        ma = after[:, None] & (ck[None, :] < K)
        q_a = tl.load(q_ptr + ((t0 + rows[:, None]) * H + i_h) * K + ck[None, :], mask=ma, other=0.0).to(tl.float32)
        b_a = tl.load(b_ptr + _b_offsets(t0 + rows[:, None], i_h, ck[None, :], H, K, SCALAR_GATE), mask=ma, other=0.0)
        r2 = tl.load(b_ptr + _b_offsets(last_row, i_h, ck, H, K, SCALAR_GATE), mask=(ck < K), other=0.0)
        q_r = tl.where(ma, q_a * tl.exp(b_a - r2[None, :]), 0.0).to(dtype)
        dk_intra = tl.dot(da_col, q_r)
        dk_intra = tl.where(mi, dk_intra * tl.exp(r2[None, :] - b_i), 0.0)
        # Pairs within the sub-chunk, exact.
        if SCALAR_GATE:
            w = da_diag * _diag_decay_scalar(b_ptr, t0, rows_i, L, i_h, H)
            dq_intra += tl.dot(w.to(dtype), k_i.to(dtype))
            dk_intra += tl.dot(tl.trans(w).to(dtype), q_i.to(dtype))
        else:
            w = da_diag[:, :, None] * _diag_decay(b_i, rows_i, L)
            dq_intra += tl.sum(w * k_i[None, :, :], axis=1)
            dk_intra += tl.sum(w * q_i[:, None, :], axis=0)
        dq = (dq + dq_intra) * scale
        dk = dk + dk_intra * scale
        db = q_i * dq - k_i * dk
        p = ((t0 + rows_i[:, None]) * H + i_h) * K + ck[None, :]
        tl.store(dq_ptr + p, dq.to(dtype), mask=mi)
        tl.store(dk_ptr + p, dk.to(dtype), mask=mi)
        tl.store(db_ptr + p, db, mask=mi)
        tl.store(dbl_ptr + ((i_c * NC + i_i) * H + i_h) * K + ck, dbl, mask=ck < K)


@triton.jit
def chunk_gate_grad_kernel(
    db_ptr, dbl_ptr, dg_ptr, cu_ptr, chunk_idx_ptr, N,
    H: tl.constexpr, K: tl.constexpr, SCALAR_GATE: tl.constexpr, BK: tl.constexpr,
):
    """dg_t = sum_{t' >= t in the chunk} db_t' + (gradient of b_L): b is a cumulative sum.

    A scalar gate sums over K, so then one program holds all of K (BK >= K).
    """
    i_c, i_h, i_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    NC: tl.constexpr = BT // BC
    seq, t0, L = _chunk_bounds(cu_ptr, chunk_idx_ptr, i_c, N)
    if seq >= N:
        return
    rows = tl.arange(0, BT)
    ck = i_k * BK + tl.arange(0, BK)
    mask = (rows[:, None] < L) & (ck[None, :] < K)
    db = tl.load(db_ptr + ((t0 + rows[:, None]) * H + i_h) * K + ck[None, :], mask=mask, other=0.0)
    dbl = tl.zeros([BK], dtype=tl.float32)
    # Only sub-chunks with rows wrote their part.
    for i in range(0, (L + BC - 1) // BC):
        dbl += tl.load(dbl_ptr + ((i_c * NC + i) * H + i_h) * K + ck, mask=ck < K, other=0.0)
    total = tl.sum(db, axis=0)
    dg = total[None, :] - tl.cumsum(db, axis=0) + db + dbl[None, :]
    if SCALAR_GATE:
        dg_s = tl.sum(tl.where(mask, dg, 0.0), axis=1)
        tl.store(dg_ptr + (t0 + rows) * H + i_h, dg_s.to(dg_ptr.dtype.element_ty), mask=rows < L)
    else:
        tl.store(dg_ptr + ((t0 + rows[:, None]) * H + i_h) * K + ck[None, :],
                 dg.to(dg_ptr.dtype.element_ty), mask=mask)
